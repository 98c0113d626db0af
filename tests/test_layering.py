"""DESIGN.md's import rule: the engine knows nothing of HTTP, money or databases; the platform nothing of HTTP."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "tokenmill"
FORBIDDEN = {
    "engine": ("tokenmill.serving", "tokenmill.platform", "tokenmill.catalog"),
    "models": ("tokenmill.serving", "tokenmill.platform", "tokenmill.catalog", "tokenmill.engine"),
    "platform": ("tokenmill.serving", "tokenmill.catalog", "tokenmill.jobs"),
    "catalog": ("tokenmill.serving",),
    "jobs": ("tokenmill.serving", "tokenmill.catalog"),
    "cluster": ("tokenmill.serving", "tokenmill.platform", "tokenmill.catalog", "tokenmill.jobs"),
    # The console is pages over the public HTTP API: it imports nothing of the server's parts.
    "console": tuple(f"tokenmill.{name}" for name in ("serving", "platform", "catalog", "engine", "models")),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package):
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_platform_reads_bottom_up():
    """No module of the platform imports, even indirectly, one that imports it back."""
    root = PACKAGE / "platform"
    graph = {
        path.stem: {
            name.split(".")[2]
            for name in imported_modules(path)
            if name.startswith("tokenmill.platform.") and name.split(".")[2] != path.stem
        }
        for path in root.glob("*.py")
    }

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        for following in graph.get(node, ()):
            if following == start or (
                following not in seen and reaches(start, following, seen | {following})
            ):
                return True
        return False

    assert [module for module in sorted(graph) if reaches(module, module, {module})] == []
