"""The trainer worker: a process of its own (never the gateway, whose CPU and GIL serve requests) that takes
fine-tuning jobs from the platform database one at a time, trains each with `trainer.train_lora`, writes
its progress as events and its epochs as checkpoints, and closes it.

A heartbeat thread keeps the claimed job alive and learns of a cancellation. On SIGTERM (the server is
shutting down) the training stops at the next step and the job goes back to the queue, to resume from its
last checkpoint under the next worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.jobs.hyperparameters import Hyperparameters
from tokenmill.jobs.training_data import TrainingDataError, TrainingSet, parse_chat_jsonl
from tokenmill.platform import fine_tuning as jobs
from tokenmill.platform import fine_tuning_runs as runs
from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict
from tokenmill.platform.file_store import FileStore, local_store
from tokenmill.platform.files import read_file_bytes
from tokenmill.platform.fine_tuning_data import artifacts_dir
from tokenmill.platform.gateway import PlatformSettings, open_migrated_database

if TYPE_CHECKING:  # torch, transformers and peft load with the first job: an idle worker stays small
    from tokenmill.jobs.trainer import TrainingProgress, TrainingResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    name: str
    """Unique among the workers sharing the database: the job's `worker` column."""
    data_dir: Path
    poll_interval_s: float = 1.0
    heartbeat_interval_s: float = 2.0
    stale_after_s: float = 30.0
    """A running job whose worker has not beaten for this long is declared lost."""


def run_worker_process(
    data_dir: Path, database_url: str | None, name: str | None, *, log_level: str = "info"
) -> int:
    """`tokenmill worker`: take jobs until SIGTERM."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db = open_migrated_database(PlatformSettings(data_dir=data_dir, database_url=database_url))
    try:
        config = WorkerConfig(name or f"{socket.gethostname()}:{os.getpid()}", data_dir)
        worker = TrainerWorker(config, db, local_store(data_dir))
        worker.install_signal_handlers()
        worker.run()
    finally:
        db.close()
    return 0


class TrainerWorker:
    def __init__(self, config: WorkerConfig, db: Database, store: FileStore) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.stopping = threading.Event()
        """Set by SIGTERM / `stop()`: finish no more jobs, give the current one back to the queue."""

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, once: bool = False) -> None:
        """Take jobs until stopped (`once`: until the queue is empty, for tests)."""
        logger.info("trainer worker %s ready", self.config.name)
        while not self.stopping.is_set():
            job = runs.claim_next(self.db, self.config.name, stale_after_s=self.config.stale_after_s)
            if job is None:
                if once:
                    return
                self.stopping.wait(self.config.poll_interval_s)
                continue
            self.run_job(job)

    def run_job(self, job: jobs.JobInfo) -> None:
        name = self.config.name
        logger.info("job %s: training %s for %s", job.id, job.model, job.org_id)
        stop_job = threading.Event()
        beating = threading.Thread(target=self._beat, args=(job.id, stop_job), daemon=True)
        beating.start()
        try:
            result = self._train(job, lambda: stop_job.is_set() or self.stopping.is_set())
        except TrainingDataError as exc:
            self._close(
                runs.fail, job.id, code="invalid_training_file", message=str(exc), param="training_file"
            )
            return
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            self._close(runs.fail, job.id, code="training_failed", message=f"{type(exc).__name__}: {exc}")
            return
        finally:
            stop_job.set()
            beating.join()
        if not result.cancelled:
            adapter = str(result.adapter_dir)
            self._close(
                runs.succeed,
                job,
                trained_tokens=result.trained_tokens,
                adapter_path=adapter,
                context_length=job.max_tokens_per_example,
            )
        elif self.stopping.is_set() and not jobs.get_job(self.db, job.org_id, job.id).cancel_requested:
            runs.requeue(
                self.db, job.id, name, "The worker stopped; the job resumes from its last checkpoint."
            )
        else:
            self._close(runs.cancelled, job.id, trained_tokens=result.trained_tokens)

    def _train(self, job: jobs.JobInfo, should_stop) -> TrainingResult:
        from tokenmill.jobs.trainer import train_lora
        from tokenmill.models.loader import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(job.base_source))
        train = self._training_set(job, job.training_file, tokenizer)
        validation = self._training_set(job, job.validation_file, tokenizer, minimum=1)
        out_dir = artifacts_dir(self.config.data_dir, job.org_id, job.id)
        checkpoint = runs.latest_checkpoint(self.db, job.id)
        if checkpoint is not None:
            runs.add_event(self.db, job.id, f"Resuming from the checkpoint at step {checkpoint.step}")
        known = {checkpoint.path} if checkpoint is not None else set()

        def on_progress(progress: TrainingProgress) -> None:
            runs.add_event(self.db, job.id, _progress_message(progress), data=_metrics(progress))
            saved = progress.checkpoint
            if saved is not None and str(saved.path) not in known:
                known.add(str(saved.path))
                runs.add_checkpoint(self.db, job.id, saved.step, _metrics(progress), str(saved.path))

        return train_lora(
            job.base_source,
            train,
            validation,
            Hyperparameters.from_dict(job.hyperparameters),
            out_dir,
            on_progress,
            should_stop,
            resume_from=Path(checkpoint.path) if checkpoint is not None else None,
        )

    def _training_set(
        self, job: jobs.JobInfo, file_id: str | None, tokenizer, minimum: int | None = None
    ) -> TrainingSet | None:
        if file_id is None:
            return None
        data = read_file_bytes(self.db, self.store, job.org_id, file_id)
        kwargs = {} if minimum is None else {"min_examples": minimum}
        return parse_chat_jsonl(data, tokenizer, job.max_tokens_per_example, **kwargs)

    def _beat(self, job_id: str, stop_job: threading.Event) -> None:
        while not stop_job.wait(self.config.heartbeat_interval_s):
            try:
                if runs.heartbeat(self.db, job_id, self.config.name):
                    stop_job.set()
            except Exception:  # a database hiccup: the next beat tries again
                logger.exception("job %s: heartbeat failed", job_id)

    def _close(self, close, job, **kwargs) -> None:
        """Close the job unless it was declared lost meanwhile (then it is another worker's)."""
        try:
            close(self.db, job, self.config.name, **kwargs)
        except Conflict as exc:
            logger.warning("%s", exc)


def _metrics(progress: TrainingProgress) -> dict:
    return {
        "step": progress.step,
        "total_steps": progress.total_steps,
        "epoch": progress.epoch,
        "train_loss": progress.train_loss,
        "valid_loss": progress.valid_loss,
        "trained_tokens": progress.trained_tokens,
    }


def _progress_message(progress: TrainingProgress) -> str:
    message = f"Step {progress.step}/{progress.total_steps}: training loss={progress.train_loss:.4f}"
    if progress.valid_loss is not None:
        message += f", validation loss={progress.valid_loss:.4f}"
    return message
