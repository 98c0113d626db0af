"""Run by test_recovery in a child process: serve some requests, leave others in flight, then die by
SIGKILL in the middle of a settle transaction, like a gateway killed mid-stream."""

from __future__ import annotations

import json
import os
import signal
import sys

from tokenmill.platform.auth import authenticate
from tokenmill.platform.billing import reserve, settle
from tokenmill.platform.db import open_database
from tokenmill.platform.ledger import append_charge, lock_organization
from tokenmill.platform.listings import resolve_listing


def main(url: str, raw_key: str, model: str, num_settled: int, num_open: int) -> None:
    db = open_database(url)
    principal = authenticate(db, raw_key)
    listing = resolve_listing(db, principal.org_id, model)
    fee_bps = listing.fee_bps(0)
    for _ in range(num_settled):
        settle(db, reserve(db, principal, listing, 10, 20, fee_bps=fee_bps), 10, 15, "ok", 0.05)
    in_flight = [reserve(db, principal, listing, 10, 20, fee_bps=fee_bps) for _ in range(num_open)]
    print(json.dumps([r.id for r in in_flight]), flush=True)
    with db.write() as session:  # a settle that never commits: its charge must vanish
        lock_organization(session, principal.org_id)
        append_charge(session, principal.org_id, 15, in_flight[0].id, db.now())
        session.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
