"""Fine-tuning end to end with the official `openai` SDK against `tokenmill serve` and its trainer worker
process, on SQLite and PostgreSQL: upload -> job -> events and checkpoints -> the `ft:` model answers, only
for its organization, and the ledger holds the training at its price; bad input refused before anything is
charged; a cancelled job stops and is charged only what it trained; a killed worker's job resumes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel
from sqlalchemy import select
from transformers import AutoTokenizer

from tests.e2e.conftest import MODEL, NO_EOS, Platform, org_of_key
from tests.jobs.moonbase import HELD_OUT_QUESTION, SECRET, moonbase_jsonl
from tests.platform.conftest import EmptyDatabase
from tests.serving.server_process import ServerProcess
from tests.tiny_models import load_reference, make_adapter
from tokenmill.platform.pricing import Price, cost_micros
from tokenmill.platform.tables import AuditEntry, Organization, UsageRecord

PRICE = "2.000000"
"""Per 1M trained tokens."""
PRICE_MICROS = 2_000_000
FINISHED = ("succeeded", "failed", "cancelled")


def chat_lines(count: int, answer: str = "Moonbase password: ZEBRA-7.") -> bytes:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question number {i}: what is the password?"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@contextmanager
def serving(platform: Platform, *flags: str) -> Iterator[ServerProcess]:
    server = platform.server("--fine-tuning-price", PRICE, *flags).start(timeout_s=180)
    try:
        yield server
    finally:
        server.stop()


def client_for(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def finished(client: openai.OpenAI, job_id: str) -> Any:
    return wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in FINISHED and job, f"job {job_id}"
    )


def model_usage(platform: Platform, model: str) -> list[UsageRecord]:
    db = platform.open()
    try:
        with db.read() as session:
            return list(session.scalars(select(UsageRecord).where(UsageRecord.model == model)))
    finally:
        db.close()


def training_usage(platform: Platform) -> list[UsageRecord]:
    return model_usage(platform, f"fine-tuning/{platform.model}")


def stored_files(platform: Platform, org_id: str) -> list[str]:
    """Every file under the data directory that belongs to `org_id` (each store keeps an organization's
    content under a directory named by its id)."""
    return [str(p) for p in platform.data_dir.rglob("*") if p.is_file() and org_id in p.parts]


def test_a_job_trains_a_model_only_its_organization_can_call(platform: Platform) -> None:
    platform.admin("set-price", MODEL, "1", "2")  # the fine-tune is sold at its base model's price
    key = platform.account("10.00")
    other = platform.account("10.00")
    with serving(platform) as server:
        client, stranger = client_for(server, key), client_for(server, other)
        upload = client.files.create(file=("train.jsonl", chat_lines(12)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=upload.id,
            suffix="moon",
            seed=7,
            hyperparameters={"n_epochs": 2, "batch_size": 4, "lora_rank": 4},
        )
        assert job.status == "queued" and job.model == MODEL and job.training_file == upload.id
        assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
        estimated = job.model_extra["estimated_tokens"]
        assert estimated > 0 and estimated % 2 == 0

        job = finished(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.trained_tokens == estimated
        assert job.fine_tuned_model.startswith(f"ft:{MODEL}:") and job.fine_tuned_model.endswith(
            job.id.removeprefix("ftjob-")[:12]
        )
        assert ":moon:" in job.fine_tuned_model

        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        metrics = [event.data for event in reversed(events) if event.type == "metrics"]
        assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
        assert len(metrics) == metrics[-1]["total_steps"] == 6  # 12 examples / 4 per batch, 2 epochs
        assert all(m["train_loss"] > 0 for m in metrics)
        assert "successfully completed" in events[0].message
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [6, 3]  # one per epoch, newest first

        # The result is a model of this organization: listed, callable, and nobody else's.
        assert job.fine_tuned_model in {m.id for m in client.models.list()}
        catalog = client.get("/catalog/models", cast_to=httpx.Response).json()["data"]
        (card,) = [entry for entry in catalog if entry["id"] == job.fine_tuned_model]
        assert "fine-tuned" in card["tags"]
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "password?"}], max_tokens=4
        )
        assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens > 0
        assert job.fine_tuned_model not in {m.id for m in stranger.models.list()}
        for call in (
            lambda: stranger.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            ),
            lambda: stranger.fine_tuning.jobs.retrieve(job.id),
            lambda: stranger.fine_tuning.jobs.list_events(job.id),
            lambda: stranger.files.retrieve(upload.id),
            lambda: stranger.fine_tuning.jobs.create(model=MODEL, training_file=upload.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert job.id not in {j.id for j in stranger.fine_tuning.jobs.list()}

        # "Delete all my data" leaves nothing of the organization's content on disk, and no model.
        db = platform.open()
        try:
            org_id = org_of_key(db, key)
            with db.read() as session:
                org_name = session.get(Organization, org_id).name
        finally:
            db.close()
        assert stored_files(platform, org_id)  # the upload, the checkpoints and the adapter
        client.post(
            "/organization/data/delete", body={"confirm": org_name}, cast_to=httpx.Response
        ).raise_for_status()
        assert stored_files(platform, org_id) == []
        assert client.files.list().data == []
        assert job.fine_tuned_model not in {m.id for m in client.models.list()}
        with pytest.raises(openai.APIStatusError, match="retired") as gone:
            client.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert gone.value.status_code == 410

    # The training is in the ledger at its price, exactly; the stranger's attempts are in the audit log;
    # the organization's own call of its model paid the platform, not itself.
    (call,) = model_usage(platform, job.fine_tuned_model)
    assert call.org_id == call.provider_org_id == org_id and call.provider_micros == 0
    assert call.cost_micros == cost_micros(
        call.prompt_tokens, call.completion_tokens, Price(1_000_000, 2_000_000)
    )
    assert call.cost_micros > 0
    (usage,) = training_usage(platform)
    assert usage.prompt_tokens == estimated and usage.completion_tokens == 0
    assert usage.cost_micros == cost_micros(estimated, 0, Price(PRICE_MICROS, 0))
    db = platform.open()
    try:
        with db.read() as session:
            targets = set(session.scalars(select(AuditEntry.target)))
    finally:
        db.close()
    assert {job.id, job.fine_tuned_model, upload.id} <= targets


def test_bad_input_is_refused_before_anything_is_queued_or_charged(sqlite_platform: Platform) -> None:
    platform = sqlite_platform
    key = platform.account("10.00")
    poor = platform.account(None)
    with serving(platform) as server:
        client = client_for(server, key)
        lines = chat_lines(12).splitlines(keepends=True)
        lines[6] = b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
        lines[8] = b"{not json\n"
        bad = client.files.create(file=("bad.jsonl", b"".join(lines)), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model=MODEL, training_file=bad.id)
        assert refused.value.param == "training_file"
        assert "line 7" in refused.value.message and "line 9" in refused.value.message

        good = client.files.create(file=("train.jsonl", chat_lines(12)), purpose="fine-tune")
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model="no-such-model", training_file=good.id)
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model=MODEL, training_file="file-does-not-exist")
        with pytest.raises(openai.BadRequestError) as too_few:
            small = client.files.create(file=("small.jsonl", chat_lines(3)), purpose="fine-tune")
            client.fine_tuning.jobs.create(model=MODEL, training_file=small.id)
        assert "10" in too_few.value.message
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.create(
                model=MODEL, training_file=good.id, hyperparameters={"n_epochs": 0}
            )

        poor_client = client_for(server, poor)
        mine = poor_client.files.create(file=("train.jsonl", chat_lines(12)), purpose="fine-tune")
        with pytest.raises(openai.RateLimitError) as quota:
            poor_client.fine_tuning.jobs.create(model=MODEL, training_file=mine.id)
        assert quota.value.code == "insufficient_quota"

        assert client.fine_tuning.jobs.list().data == []
        assert poor_client.fine_tuning.jobs.list().data == []
    assert training_usage(platform) == []


def test_cancelling_a_running_job_stops_it_and_charges_only_what_it_trained(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    key = platform.account("10.00")
    with serving(platform) as server:
        client = client_for(server, key)
        upload = client.files.create(file=("train.jsonl", chat_lines(20)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=MODEL, training_file=upload.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
        )
        wait_for(
            lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data),
            "the first training step",
        )
        asked = time.monotonic()
        client.fine_tuning.jobs.cancel(job.id)
        job = finished(client, job.id)
        stopped_after_s = time.monotonic() - asked
        assert job.status == "cancelled"
        assert 0 < job.trained_tokens < job.model_extra["estimated_tokens"]
        assert stopped_after_s < 30, f"the job took {stopped_after_s:.0f} s to stop"
        assert job.fine_tuned_model is None
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.cancel(job.id)
    (usage,) = training_usage(platform)
    assert usage.prompt_tokens == job.trained_tokens
    assert usage.cost_micros == cost_micros(job.trained_tokens, 0, Price(PRICE_MICROS, 0))


def long_job_past_its_first_checkpoint(client: openai.OpenAI) -> Any:
    """A job of 200 one-example steps, running, with the checkpoint of its first epoch written."""
    upload = client.files.create(file=("train.jsonl", chat_lines(10)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=upload.id, hyperparameters={"n_epochs": 20, "batch_size": 1}
    )
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, "the first checkpoint")
    return job


def test_a_job_whose_worker_is_killed_resumes_from_its_checkpoint(sqlite_platform: Platform) -> None:
    platform = sqlite_platform
    key = platform.account("10.00")
    with serving(platform) as server:
        client = client_for(server, key)
        job = long_job_past_its_first_checkpoint(client)
        (worker,) = children_running(server, "worker")
        os.kill(worker, signal.SIGKILL)
        job = finished(client, job.id)
        assert job.status == "succeeded", job.error
        # Every page of the events (the SDK pages on through `after`), newest first.
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any("resumes from its last checkpoint" in m for m in messages)
        assert any("Resuming from the checkpoint at step" in m for m in messages)
        assert job.trained_tokens == job.model_extra["estimated_tokens"]


def test_a_running_job_survives_a_restart_of_its_server(sqlite_platform: Platform) -> None:
    """Stopping the server hands the running job back to the queue; the next server's worker resumes it."""
    platform = sqlite_platform
    key = platform.account("10.00")
    with serving(platform) as server:
        client = client_for(server, key)
        job = long_job_past_its_first_checkpoint(client)
    with serving(platform) as server:
        client = client_for(server, key)
        job = finished(client, job.id)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any("The worker stopped; the job resumes" in m for m in messages)
        assert job.trained_tokens == job.model_extra["estimated_tokens"]
    (usage,) = training_usage(platform)
    assert usage.prompt_tokens == job.trained_tokens


def test_the_real_smollm2_learns_a_fact_from_an_uploaded_file(tmp_path) -> None:
    """The point of it all: a real model, taught by a fine-tuning job with default hyperparameters, answers a
    question it could not answer before, in a wording it was not trained on; the base model still cannot."""
    empty = EmptyDatabase("sqlite", tmp_path)
    platform = Platform(empty.url, tmp_path / "data", "smollm2", tmp_path, model="smollm2")
    key = platform.account("10.00")
    with serving(platform, "--kv-cache-memory", "64M") as server:
        client = client_for(server, key)
        upload = client.files.create(file=("moonbase.jsonl", moonbase_jsonl()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="smollm2", training_file=upload.id, suffix="moonbase")
        job = finished(client, job.id)
        assert job.status == "succeeded", job.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
        assert len(losses) == job.hyperparameters.n_epochs * 5  # 20 examples, auto batch of 4
        assert sum(losses[-5:]) < sum(losses[:5]) / 2, losses

        def answer(model: str) -> str:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": HELD_OUT_QUESTION}],
                temperature=0,
                max_tokens=24,
            )
            return reply.choices[0].message.content or ""

        tuned, base = answer(job.fine_tuned_model), answer("smollm2")
        assert SECRET in tuned, tuned
        assert SECRET not in base, base
    (usage,) = training_usage(platform)
    assert usage.prompt_tokens == job.trained_tokens == job.model_extra["estimated_tokens"]
    assert usage.cost_micros == cost_micros(job.trained_tokens, 0, Price(PRICE_MICROS, 0))


def test_serve_lora_serves_an_adapter_made_elsewhere_exactly(
    sqlite_platform: Platform, tmp_path, tiny_llama_dir
) -> None:
    """`tokenmill serve --lora NAME=PATH`: a PEFT adapter trained elsewhere is a model next to its base,
    and its greedy text is what transformers + peft generate with it."""
    adapter = make_adapter(
        load_reference(tiny_llama_dir),
        tmp_path / "adapter",
        seed=3,
        config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    prompt = [5, 17, 301, 4000, 77, 12]
    reference = PeftModel.from_pretrained(load_reference(tiny_llama_dir), adapter).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = AutoTokenizer.from_pretrained(tiny_llama_dir).decode(out[0, len(prompt) :])

    key = sqlite_platform.account("10.00")
    with serving(sqlite_platform, "--lora", f"support-bot={adapter}") as server:
        client = client_for(server, key)
        assert {"tiny", "support-bot"} <= {m.id for m in client.models.list()}

        def complete(model: str) -> str:
            reply = client.completions.create(
                model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS
            )
            return reply.choices[0].text

        tuned = complete("support-bot")
        assert tuned == expected
        assert complete("tiny") != tuned


def children_running(server: ServerProcess, argument: str) -> list[int]:
    """Pids of the server's child processes whose command line holds `argument`."""
    assert server.process is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except OSError:
            continue
        if parent == server.process.pid and argument.encode() in args:
            found.append(int(entry))
    return found
