"""End to end with real processes and real databases: `tokenmill serve` subprocesses (a tiny random-weight
Llama with the real SmolLM2 tokenizer) in front of a SQLite file or a private PostgreSQL schema, set up with
the admin CLI, checked through HTTP and straight in the database."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.platform.conftest import BACKENDS, EmptyDatabase
from tests.serving.server_process import ServerProcess
from tokenmill import cli
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.tables import LedgerEntry, Reservation, UsageRecord

pytest.importorskip("tokenmill.engine.async_engine")

MODEL = "tiny"
NO_EOS = {"logit_bias": {"2": -100}}
"""Random weights: keep EOS from ending a generation early, so each request generates exactly max_tokens."""


@dataclass
class Platform:
    """One database and data directory shared by the servers and the admin CLI of a test."""

    url: str
    data_dir: Path
    model_dir: Path | str
    """A model directory, or `smollm2` for the real built-in model."""
    log_dir: Path
    model: str = MODEL
    """The served name of the model."""

    def admin(self, *args: str) -> str:
        """`tokenmill admin ...` (in this process: same code path, no interpreter start-up) -> its stdout."""
        out, err = io.StringIO(), io.StringIO()
        argv = ["admin", *args, "--data-dir", str(self.data_dir), "--database-url", self.url]
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(argv)
        assert status == 0, f"tokenmill {' '.join(argv)} failed: {err.getvalue()}"
        return out.getvalue().strip()

    def account(self, balance: str | None = None, *key_flags: str, tier: str = "unlimited") -> str:
        """A fresh organization, user and key (+ balance); returns the key."""
        name = f"org-{time.monotonic_ns()}"
        self.admin("create-org", name, "--tier", tier)
        self.admin("create-user", name, f"{name}@example.com")
        if balance is not None:
            self.admin("top-up", name, balance, "--idempotency-key", f"{name}-seed")
        return self.admin("create-key", f"{name}@example.com", *key_flags)

    def server(self, *flags: str, name: str = "serve") -> ServerProcess:
        args = [
            "--model", f"{self.model}={self.model_dir}", "--embedding-model", "none", "--database-url", self.url,
            "--kv-cache-memory", "4M", "--max-num-seqs", "64", "--max-queue", "256", *flags,
        ]  # fmt: skip
        return ServerProcess(args, self.log_dir / f"{name}.log", data_dir=self.data_dir)

    def open(self) -> Database:
        return open_database(self.url)


@pytest.fixture(params=BACKENDS)
def platform(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path) -> Iterator[Platform]:
    empty = EmptyDatabase(request.param, tmp_path)
    yield Platform(empty.url, tmp_path / "data", tiny_llama_dir, tmp_path)
    empty.drop()


@pytest.fixture
def sqlite_platform(tmp_path: Path, tiny_llama_dir: Path) -> Platform:
    empty = EmptyDatabase("sqlite", tmp_path)
    return Platform(empty.url, tmp_path / "data", tiny_llama_dir, tmp_path)


@pytest.fixture
def servers() -> Iterator[Callable[[ServerProcess], ServerProcess]]:
    """`start(process)`: started now, stopped at the end of the test whatever happens."""
    started: list[ServerProcess] = []

    def start(process: ServerProcess) -> ServerProcess:
        started.append(process)
        return process.start(timeout_s=120)

    yield start
    for process in started:
        process.stop()


@dataclass(frozen=True)
class Books:
    """What the database says about one organization's money."""

    num_open: int
    num_settled: int
    num_released: int
    num_usage_records: int
    usage_cost_micros: int
    charges_micros: int
    """Sum of the (negative) charge entries."""
    balance_micros: int
    lowest_running_balance_micros: int
    prompt_tokens: int
    completion_tokens: int


def books(db: Database, org_id: str) -> Books:
    with db.read() as session:
        states = dict(
            session.execute(
                select(Reservation.state, func.count())
                .where(Reservation.org_id == org_id)
                .group_by(Reservation.state)
            ).all()
        )
        records = session.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.org_id == org_id).order_by(LedgerEntry.id)
        ).all()
    running, lowest = 0, 0
    for entry in entries:  # charges take the organization lock, so id order is the order they committed in
        running += entry.amount_micros
        lowest = min(lowest, running)
    return Books(
        num_open=states.get("open", 0),
        num_settled=states.get("settled", 0),
        num_released=states.get("released", 0),
        num_usage_records=len(records),
        usage_cost_micros=sum(r.cost_micros for r in records),
        charges_micros=sum(e.amount_micros for e in entries if e.kind == "charge"),
        balance_micros=running,
        lowest_running_balance_micros=lowest,
        prompt_tokens=sum(r.prompt_tokens for r in records),
        completion_tokens=sum(r.completion_tokens for r in records),
    )


def org_of_key(db: Database, raw_key: str) -> str:
    from tokenmill.platform.auth import authenticate

    return authenticate(db, raw_key).org_id
