"""The model square end to end: one `tokenmill serve --config models.yaml` process selling two tiny chat
models of different architectures (by two provider organizations) and the platform's free embedding model,
with the organizations, users and keys made through the admin HTTP API. `start_market` is the whole setup."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from openai import OpenAI
from sqlalchemy import func, select

from tests.serving.server_process import ServerProcess
from tokenmill import cli
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.tables import LedgerEntry

LLAMA = "acme/llama-chat"
"""Slashes in the ids on purpose: every route takes the model id as a path."""
QWEN = "beta/qwen2-chat"
EMBEDDING = "all-MiniLM-L6-v2"

LLAMA_INPUT_MICROS, LLAMA_OUTPUT_MICROS = 1_234_567, 9_876_543
"""Micros per 1M tokens ("1.234567" and "9.876543" units): almost no request costs a whole micro."""
LLAMA_FEE_BPS = 3333
QWEN_INPUT_MICROS, QWEN_OUTPUT_MICROS = 500_000, 1_500_000
SERVER_FEE_BPS = 2500
"""`--platform-fee-bps`: the fee of the qwen2 listing, which sets none of its own."""
LLAMA_CONTEXT, QWEN_CONTEXT, EMBEDDING_CONTEXT = 384, 192, 256
LLAMA_DESCRIPTION = "A nimble Llama for quick drafts and rewrites."

ORGS = ("acme", "beta", "gamma", "buyer")
"""acme and beta sell; gamma may call beta's shared model; buyer is anybody else."""
TOP_UP_MICROS = 5_000_000


def _units(micros: int) -> str:
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def models_yaml(llama_dir: Path, qwen2_dir: Path) -> dict[str, Any]:
    def engine(max_model_len: int) -> dict[str, Any]:
        return {
            "dtype": "float32",
            "max_model_len": max_model_len,
            "kv_cache_memory": "16M",
            "max_num_seqs": 8,
        }

    return {
        "models": [
            {
                "id": LLAMA, "source": str(llama_dir), "pinned": True, "engine": engine(LLAMA_CONTEXT),
                "listing": {
                    "display_name": "Acme Llama Chat", "description": LLAMA_DESCRIPTION, "provider": "acme",
                    "tags": ["chat", "english", "tiny"], "license": "apache-2.0",
                    "price": {"input": _units(LLAMA_INPUT_MICROS), "output": _units(LLAMA_OUTPUT_MICROS)},
                    "platform_fee_bps": LLAMA_FEE_BPS,
                },
            },
            {
                "id": QWEN, "source": str(qwen2_dir), "pinned": True, "engine": engine(QWEN_CONTEXT),
                "listing": {
                    "display_name": "Beta Qwen2 Chat", "description": "Shared with our partners only.",
                    "provider": "beta", "tags": ["chat", "multilingual"], "license": "qwen",
                    "price": {"input": _units(QWEN_INPUT_MICROS), "output": _units(QWEN_OUTPUT_MICROS)},
                    "visibility": "shared", "shared_with": ["gamma"],
                },
            },
            {
                "id": EMBEDDING, "source": "all-MiniLM-L6-v2", "task": "embedding", "pinned": True,
                "listing": {
                    "display_name": "MiniLM sentence embeddings", "description": "384 dimensions.",
                    "tags": ["embedding", "search"], "license": "apache-2.0", "price": "free",
                },
            },
        ]
    }  # fmt: skip


@dataclass
class Market:
    server: ServerProcess
    data_dir: Path
    database_url: str
    admin_key: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    """Organization name -> an API key of one of its users."""
    org_ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def request(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def as_org(self, org: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.request(method, path, self.keys[org], **kwargs)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.request(method, f"/v1/admin{path}", self.admin_key, json=body)
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def admin_cli(self, *args: str) -> str:
        """`tokenmill admin ...` in this process (same code path as the command, no interpreter start-up)."""
        out, err = io.StringIO(), io.StringIO()
        argv = ["admin", *args, "--data-dir", str(self.data_dir), "--database-url", self.database_url]
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(argv)
        assert status == 0, f"tokenmill {' '.join(argv)} failed: {err.getvalue()}"
        return out.getvalue().strip()

    def openai(self, org: str) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[org], max_retries=0, timeout=60)

    def model_ids(self, org: str) -> list[str]:
        response = self.as_org(org, "GET", "/v1/models")
        assert response.status_code == 200, response.text
        return [card["id"] for card in response.json()["data"]]

    def chat(self, org: str, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
        return self.as_org(org, "POST", "/v1/chat/completions", json=body)

    def open_db(self) -> Database:
        return open_database(self.database_url)

    def balance_micros(self, org: str) -> int:
        """The ledger's own sum, straight from the database."""
        db = self.open_db()
        try:
            with db.read() as session:
                total = session.scalar(
                    select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
                        LedgerEntry.org_id == self.org_ids[org]
                    )
                )
        finally:
            db.close()
        return int(total or 0)

    def add_account(self, org: str, *, tier: str = "unlimited", create_org: bool = True) -> str:
        """A user and key in `org` (created first unless it exists), on `tier`, with `TOP_UP_MICROS`."""
        if create_org:
            made = self.admin("POST", "/organizations", {"name": org, "tier": tier})
        else:
            made = self.admin("PATCH", f"/organizations/{org}", {"tier": tier})
        self.org_ids[org] = made["id"]
        email = f"dev@{org}.example"
        self.admin("POST", "/users", {"org": org, "email": email})
        self.keys[org] = self.admin("POST", "/keys", {"user": email})["key"]
        top_up = {"amount_micros": TOP_UP_MICROS, "idempotency_key": f"{org}-seed"}
        self.admin("POST", f"/organizations/{org}/top-ups", top_up)
        return self.keys[org]


@contextmanager
def start_market(work_dir: Path, llama_dir: Path, qwen2_dir: Path) -> Iterator[Market]:
    """gamma must exist before the server starts (models.yaml shares with it by name); acme and beta are
    created by the server itself, as providers named in the file."""
    config = work_dir / "models.yaml"
    config.write_text(yaml.safe_dump(models_yaml(llama_dir, qwen2_dir), sort_keys=False))
    data_dir = work_dir / "data"
    database_url = f"sqlite:///{work_dir / 'tokenmill.db'}"
    args = [
        "--config",
        str(config),
        "--database-url",
        database_url,
        "--platform-fee-bps",
        str(SERVER_FEE_BPS),
    ]
    market = Market(ServerProcess(args, work_dir / "serve.log", data_dir=data_dir), data_dir, database_url)
    market.admin_cli("create-org", "gamma", "--tier", "unlimited")
    market.server.start(timeout_s=120)
    try:
        market.admin_key = (data_dir / "admin_key").read_text().strip()
        for org in ORGS:
            market.add_account(org, create_org=org == "buyer")
        yield market
    finally:
        market.server.stop()


def error_body(response: httpx.Response) -> dict[str, Any]:
    return json.loads(response.content)
