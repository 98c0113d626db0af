"""Fine-tuning's part in the data controls: an organization's jobs keep their checkpoints and adapters under
`<data dir>/fine_tuning/<org_id>/<job_id>/`. Retention deletes the checkpoints of jobs that ended longer
ago than the organization keeps data (the adapter stays: it is the fine-tuned model, deleted with
DELETE /v1/models/{id}); "delete all my data" deletes the organization's fine-tuned models (rows, retired
listings) and every file of its jobs; the export holds its jobs' adapters and checkpoints."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from tokenmill.platform import fine_tuned_models
from tokenmill.platform import fine_tuning as jobs
from tokenmill.platform.data_controls import ContentOwner, directory_owner
from tokenmill.platform.db import Database

FINE_TUNING_DIR = "fine_tuning"


def artifacts_dir(data_dir: Path, org_id: str, job_id: str) -> Path:
    """Where a job's checkpoints and adapter live: one directory per organization, deleted with its data."""
    return data_dir / FINE_TUNING_DIR / org_id / job_id


def fine_tuning_owner(db: Database, data_dir: str | Path) -> ContentOwner:
    data_dir = Path(data_dir).expanduser()
    files = directory_owner(FINE_TUNING_DIR, data_dir / FINE_TUNING_DIR)

    def delete_org(org_id: str) -> int:
        return len(fine_tuned_models.delete_org_models(db, org_id)) + files.delete_org(org_id)

    def sweep(now: datetime, retention: Mapping[str, int]) -> int:
        deleted = 0
        for org_id, days in retention.items():
            for job_id, adapter in jobs.finished_before(db, org_id, now - timedelta(days=days)):
                deleted += len(jobs.delete_checkpoints(db, job_id))
                job_dir = artifacts_dir(data_dir, org_id, job_id)
                keep = Path(adapter) if adapter is not None else None
                for child in job_dir.iterdir() if job_dir.is_dir() else ():
                    if keep is None or not keep.is_relative_to(child):
                        _remove(child)
        return deleted

    def export(org_id: str, archive: zipfile.ZipFile) -> None:
        assert files.export is not None
        files.export(org_id, archive)

    return ContentOwner(name=FINE_TUNING_DIR, delete_org=delete_org, sweep=sweep, export=export)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
