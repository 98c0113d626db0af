"""The console's sources, read as files: both languages have the same strings, every literal string key the
pages look up exists, and no script builds HTML from strings (the XSS rule: text goes in as text)."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).parents[2] / "src" / "tokenmill" / "console" / "static"
KEY = re.compile(r'^\s*"([a-z0-9_]+\.[a-z0-9_.]+)":', re.M)
LOOKUP = re.compile(r"""\bt\(\s*["'`]([a-z0-9_]+\.[a-z0-9_.]+)["'`]""")
HTML_SINKS = re.compile(
    r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function\("
)


def _keys(language: str) -> list[str]:
    return KEY.findall((STATIC / "i18n" / f"{language}.js").read_text())


def _scripts() -> list[Path]:
    return sorted((STATIC / "js").rglob("*.js"))


def test_english_and_chinese_have_the_same_keys_once_each():
    english, chinese = _keys("en"), _keys("zh")
    assert len(english) == len(set(english)), "a key appears twice in en.js"
    assert len(chinese) == len(set(chinese)), "a key appears twice in zh.js"
    assert set(english) == set(chinese), set(english) ^ set(chinese)


def test_every_key_a_page_looks_up_exists():
    known = set(_keys("en"))
    missing = {
        f"{path.name}: {key}"
        for path in _scripts()
        for key in LOOKUP.findall(path.read_text())
        if key not in known
    }
    assert not missing, sorted(missing)


def test_no_script_turns_strings_into_markup():
    offenders = [
        f"{path.name}: {match.group(0)}"
        for path in _scripts()
        for match in HTML_SINKS.finditer(path.read_text())
    ]
    assert not offenders, offenders
