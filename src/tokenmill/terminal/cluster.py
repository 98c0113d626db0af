"""`tokenmill cluster status | drain | drain-node`: the operator's view of a running server's replicas, by
node (this machine, or the Ray nodes their actors run on), and taking replicas out before a node is removed.
Talks to the server's admin API (`/v1/admin/models`) with the admin key, like any other admin client."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx

from tokenmill.config import default_data_dir

THIS_MACHINE = "local"
"""The node name of replicas running on the server's own machine (in its process or a worker process)."""
TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    server.add_argument(
        "--admin-key", help="the server's admin key (default: the admin_key file in --data-dir)"
    )
    server.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where admin_key is")
    actions = parser.add_subparsers(dest="action", required=True, metavar="action")
    actions.add_parser("status", parents=[server], help="nodes, replicas, their load and memory")
    drain = actions.add_parser(
        "drain", parents=[server], help="take one replica out: it finishes its requests, then stops"
    )
    drain.add_argument("model")
    drain.add_argument("replica", type=int, help="its index, as status shows it")
    node = actions.add_parser(
        "drain-node", parents=[server], help="take out every replica on a node (status names the nodes)"
    )
    node.add_argument("node", help=f"a Ray node's address, or {THIS_MACHINE!r} for this machine")
    for each in (drain, node):
        each.add_argument(
            "--timeout",
            type=float,
            help="seconds after which requests still running are ended (default: none)",
        )


def run(args: argparse.Namespace) -> int:
    key = args.admin_key or _read_admin_key(args.data_dir)
    if key is None:
        print(f"tokenmill cluster: no --admin-key and no {args.data_dir / 'admin_key'}", file=sys.stderr)
        return 2
    client = _Admin(args.url.rstrip("/"), key)
    try:
        if args.action == "status":
            print(render_status(client.get("/v1/admin/models")))
            return 0
        if args.action == "drain":
            targets = [(args.model, args.replica)]
        else:
            targets = replicas_on(client.get("/v1/admin/models"), args.node)
            if not targets:
                print(f"tokenmill cluster: no replica runs on {args.node!r}", file=sys.stderr)
                return 1
        return asyncio.run(_drain_all(client, targets, args.timeout))
    except httpx.HTTPError as exc:
        print(f"tokenmill cluster: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except _Refused as exc:
        print(f"tokenmill cluster: {exc}", file=sys.stderr)
        return 1


def render_status(listing: dict[str, Any]) -> str:
    """One line per replica, grouped by node, then one per model."""
    rows = [
        ("NODE", "MODEL", "REPLICA", "PID", "STATE", "RUNNING", "WAITING", "IN FLIGHT", "KV USE", "MEMORY")
    ]
    chat = [m for m in listing["data"] if m["task"] == "chat"]
    for model in chat:
        for replica in model["replicas"]:
            memory = model["memory_bytes"] // max(1, len(model["replicas"]))
            rows.append(
                (
                    replica["node"] or THIS_MACHINE,
                    model["id"],
                    str(replica["index"]),
                    str(replica["pid"] or "-"),
                    _replica_state(replica),
                    str(replica["running_seqs"]),
                    str(replica["waiting_seqs"]),
                    str(replica["in_flight_seqs"]),
                    f"{replica['kv_cache_usage']:.0%}",
                    _mib(memory),
                )
            )
    header, body = rows[0], sorted(rows[1:], key=lambda r: (r[0] != THIS_MACHINE, r[0], r[1], int(r[2])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [_columns(row, widths) for row in (header, *body)]
    if not body:
        lines.append("(no replica is running)")
    lines.append("")
    for model in chat:
        lines.append(_model_line(model))
    budget = listing.get("memory_budget_bytes")
    used = _mib(listing["memory_used_bytes"])
    lines.append(f"memory: {used} booked" + ("" if budget is None else f" of a {_mib(budget)} budget"))
    return "\n".join(lines)


def replicas_on(listing: dict[str, Any], node: str) -> list[tuple[str, int]]:
    """(model, replica index) of every replica on `node` that still takes requests."""
    return [
        (model["id"], replica["index"])
        for model in listing["data"]
        for replica in model["replicas"]
        if (replica["node"] or THIS_MACHINE) == node and not replica["draining"]
    ]


class _Refused(Exception):
    pass


class _Admin:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}

    def get(self, path: str) -> dict[str, Any]:
        return _answer(httpx.get(f"{self.url}{path}", headers=self.headers, timeout=TIMEOUT_S))


async def _drain_all(client: _Admin, targets: list[tuple[str, int]], timeout_s: float | None) -> int:
    """Side by side: each waits for its replica's requests to end."""
    body = None if timeout_s is None else {"timeout_s": timeout_s}
    async with httpx.AsyncClient(base_url=client.url, headers=client.headers, timeout=None) as http:
        responses = await asyncio.gather(
            *(
                http.post(f"/v1/admin/models/{model}/replicas/{index}/drain", json=body)
                for model, index in targets
            ),
            return_exceptions=True,
        )
    failed = 0
    for (model, index), response in zip(targets, responses, strict=True):
        try:
            if isinstance(response, BaseException):
                raise _Refused(str(response))
            left = _answer(response)
            print(f"{model} replica {index}: drained; {len(left['replicas'])} replica(s) left")
        except _Refused as exc:
            failed += 1
            print(f"{model} replica {index}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise _Refused(f"{response.status_code}: {message}")
    return response.json()


def _read_admin_key(data_dir: Path) -> str | None:
    try:
        return (data_dir / "admin_key").read_text().strip() or None
    except OSError:
        return None


def _replica_state(replica: dict[str, Any]) -> str:
    if replica["draining"]:
        return "draining"
    return "serving" if replica["healthy"] else "restarting"


def _model_line(model: dict[str, Any]) -> str:
    serving = sum(not r["draining"] for r in model["replicas"])
    line = f"{model['id']}: {model['state']}, {serving} replica(s), routing {model['routing']}"
    scaling = model.get("autoscaling")
    if scaling is not None:
        line += (
            f", autoscaling {scaling['min_replicas']}-{scaling['max_replicas']}"
            f" at {scaling['target_in_flight']} in flight per replica"
        )
    if model["prefix_cache_hit_rate"] is not None:
        line += f", prefix-cache hits {model['prefix_cache_hit_rate']:.0%}"
    if model.get("last_scaling"):
        line += f"; last scaling: {model['last_scaling']}"
    if model["reason"]:
        line += f"; {model['reason']}"
    return line


def _columns(row: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"
