"""`tokenmill bench serve`: load-test any OpenAI-compatible endpoint (tokenmill or another server) at one load
point or across a sweep of request rates, and report latency, throughput, goodput under an SLO, and cost.

Flags -> workload, load shapes and target here; the parts live in workload.py (what is sent), load.py (when),
client.py (how, and what the client saw), metrics.py and cost.py (pure math over the request log),
report.py (JSON, Markdown, PNG) and saved.py (a saved run read back). httpx, tqdm and matplotlib are imported
only when measuring or plotting, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenmill.bench import routing, tidal
from tokenmill.bench.client import Target, first_model, send
from tokenmill.bench.cost import cost_report
from tokenmill.bench.load import LoadShape, run_load
from tokenmill.bench.metrics import Slo, summarize
from tokenmill.bench.record import RequestRecord
from tokenmill.bench.report import markdown_summary, plot_latency_vs_throughput, write_json
from tokenmill.bench.saved import load_run
from tokenmill.bench.workload import SyntheticWorkload, Workload, load_jsonl

DEFAULT_NUM_REQUESTS = 100
WARMUP_SEED_OFFSET = 1_000_003  # warmup prompts share nothing with measured ones (no prefix-cache help)
ROUTING_SEED_STRIDE = 7_919  # --compare-routing: every run's prompts are its own


def rate_list(text: str) -> list[float]:
    """ "1,2,4,inf" -> [1.0, 2.0, 4.0, inf]."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rates such as 1,2,4,inf") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be positive numbers (or inf)")
    return rates


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="default: %(default)s")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    target.add_argument(
        "--admin-key",
        default=os.environ.get("TOKENMILL_ADMIN_KEY"),
        help="tokenmill's admin key, for --compare-routing (default: $TOKENMILL_ADMIN_KEY)",
    )
    target.add_argument("--model", help="model id (default: the first one GET /models lists)")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s")
    target.add_argument(
        "--extra-body",
        type=json_object,
        default={},
        metavar="JSON",
        help="merged into every request, e.g. '{\"ignore_eos\": true}' (vLLM) or a logit_bias against EOS",
    )
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")

    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--workload", choices=("fixed", "random", "shared-prefix", "jsonl"), default="fixed"
    )
    workload.add_argument("--input-len", type=int, default=128, help="target prompt tokens (default: 128)")
    workload.add_argument("--output-len", type=int, default=128, help="max_tokens (default: 128)")
    workload.add_argument(
        "--range-ratio", type=float, default=0.5, help="random: lengths uniform in len*(1±r) (default: 0.5)"
    )
    workload.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    workload.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes")
    workload.add_argument(
        "--prompts-file", type=Path, help="jsonl: one {messages|prompt, max_tokens?} a line"
    )
    workload.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load: one of --request-rate, --concurrency, --sweep; and bounds")
    shape = load.add_mutually_exclusive_group()
    shape.add_argument("--request-rate", type=float, help="Poisson arrivals, requests/s (inf: all at once)")
    shape.add_argument(
        "--concurrency", type=int, help="closed loop: this many users, each sending again when answered"
    )
    shape.add_argument("--sweep", type=rate_list, metavar="R1,R2,...", help="request rates, one point each")
    load.add_argument(
        "--num-requests", type=int, help=f"per point (default: {DEFAULT_NUM_REQUESTS} without --duration)"
    )
    load.add_argument("--duration", type=float, help="per point: stop sending after this many seconds")
    load.add_argument(
        "--from-results",
        type=Path,
        metavar="RESULTS_JSON",
        help="no traffic: report a run saved with --save-requests again (e.g. under another SLO or price)",
    )
    load.add_argument("--num-warmup", type=int, default=1, help="unmeasured requests first (default: 1)")
    load.add_argument(
        "--with-batch",
        type=int,
        metavar="N",
        help="tokenmill only: run the load alone, then beside a batch of N lines (same workload, Batch API) "
        "and compare live TTFT/TPOT and total output tokens/s",
    )
    load.add_argument(
        "--compare-routing",
        action="store_true",
        help="tokenmill only (needs --admin-key): run the load under least-load routing, then under prefix "
        "routing across the model's replicas, and compare the prefix-cache hit rate and TTFT",
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="R",
        help="--with-batch / --compare-routing: repeat the pair R times (the order alternating) and report "
        "the median ratios (default: 1)",
    )

    report = parser.add_argument_group("SLO, cost and output")
    report.add_argument("--slo-ttft", type=float, default=1.0, help="seconds (default: 1)")
    report.add_argument(
        "--slo-tokens-per-s", type=float, default=20.0, help="per stream and per user (default: 20)"
    )
    report.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="share of requests a load must meet the SLO for (0.9)",
    )
    report.add_argument("--price-per-hour", type=float, help="hardware $/hour: adds the cost report")
    report.add_argument(
        "--output-dir", type=Path, default=Path("bench-results/serve"), help="default: %(default)s"
    )
    report.add_argument("--save-requests", action="store_true", help="put the whole request log in the JSON")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_workload(args: argparse.Namespace, seed: int) -> Workload:
    if args.workload == "jsonl":
        if args.prompts_file is None:
            raise ValueError("--workload jsonl needs --prompts-file")
        return load_jsonl(args.prompts_file, args.endpoint, args.output_len)
    return SyntheticWorkload(
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio if args.workload == "random" else 0.0,
        prefix_len=args.prefix_len if args.workload == "shared-prefix" else 0,
        num_prefixes=args.num_prefixes,
        seed=seed,
    )


def load_shapes(args: argparse.Namespace) -> list[LoadShape]:
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    bounds = {"num_requests": num_requests, "duration_s": args.duration}
    if args.concurrency is None and args.sweep is None and args.request_rate is None:
        raise ValueError("give a load: --request-rate R, --concurrency N or --sweep R1,R2,...")
    if args.concurrency is not None:
        return [LoadShape(concurrency=args.concurrency, **bounds)]
    rates = args.sweep if args.sweep is not None else [args.request_rate]
    return [LoadShape(request_rate=rate, **bounds) for rate in rates]


async def measure(
    args: argparse.Namespace, shapes: list[LoadShape]
) -> tuple[Target, list[tuple[LoadShape, list[RequestRecord]]], list[tidal.BatchWindow] | None]:
    """Warm up, then run each load point in turn, each with its own prompts (a later point must not find
    an earlier point's prompts in the prefix cache); with --with-batch, the first point again beside a batch
    (what the batch did in that window comes back too)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # trust_env=False: a latency benchmark talks to the endpoint directly, never through a proxy from the env.
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
        model = args.model or await first_model(client, args.base_url, args.api_key)
        target = Target(args.base_url, model, args.endpoint, args.api_key, args.temperature, args.extra_body)
        warmup = make_workload(args, args.seed + WARMUP_SEED_OFFSET)
        for index in range(args.num_warmup):
            record = await send(client, target, warmup.request(index), 0.0)
            if not record.ok:
                raise ValueError(
                    f"warmup request to {target.url} failed: {record.error} {record.error_detail}"
                )
        if args.with_batch:
            return target, *await _interference(args, client, target, shapes[0])
        if args.compare_routing:
            return target, await _routing_rounds(args, client, target, shapes[0]), None
        results = []
        for point, shape in enumerate(shapes):
            workload = make_workload(args, args.seed + point)

            async def sender(index: int, start: float, workload: Workload = workload) -> RequestRecord:
                return await send(client, target, workload.request(index), start)

            records = await run_load(shape, sender, seed=args.seed + point, progress=not args.no_progress)
            results.append((shape, records))
    return target, results, None


async def _interference(
    args: argparse.Namespace, client: Any, target: Target, shape: LoadShape
) -> tuple[list[tuple[LoadShape, list[RequestRecord]]], list[tidal.BatchWindow]]:
    """Rounds of the load alone then beside a batch: on a shared machine one pair can differ by chance as
    much as by the batch, so rounds alternate and the report takes medians."""
    results, windows = [], []
    for round_ in range(args.rounds):
        seed = args.seed + round_
        workload = make_workload(args, seed)

        async def sender(index: int, start: float, workload: Workload = workload) -> RequestRecord:
            return await send(client, target, workload.request(index), start)

        results.append((shape, await run_load(shape, sender, seed=seed, progress=not args.no_progress)))
        records, window = await _beside_batch(args, client, target, shape, seed)
        results.append((shape, records))
        windows.append(window)
    return results, windows


async def _routing_rounds(
    args: argparse.Namespace, client: Any, target: Target, shape: LoadShape
) -> list[tuple[LoadShape, list[RequestRecord]]]:
    """Per round, the load under each policy: the same arrival times, but prompts (and shared prefixes) of
    each run's own, so no run finds another's in a replica's cache. Results are least-load first in each
    round, whichever ran first."""
    results = []
    for round_ in range(args.rounds):
        runs = {}
        for turn, policy in enumerate(routing.order(round_)):
            await routing.set_routing(client, target, args.admin_key, policy)
            workload = make_workload(args, args.seed + ROUTING_SEED_STRIDE * (round_ + 1) + turn)

            async def sender(index: int, start: float, workload: Workload = workload) -> RequestRecord:
                return await send(client, target, workload.request(index), start)

            seed = args.seed + round_
            runs[policy] = await run_load(shape, sender, seed=seed, progress=not args.no_progress)
        results += [(shape, runs[policy]) for policy in routing.POLICIES]
    await routing.set_routing(client, target, args.admin_key, "prefix")  # the server's default again
    return results


async def _beside_batch(
    args: argparse.Namespace, client: Any, target: Target, shape: LoadShape, seed: int
) -> tuple[list[RequestRecord], tidal.BatchWindow]:
    """The round's load again, the same lengths at the same arrival times (reworded, so the prefix cache
    holds nothing of it), while a batch runs."""
    batch_work = make_workload(args, seed + tidal.BATCH_SEED_OFFSET)
    batch_id = await tidal.start_batch(client, target, tidal.batch_input(target, batch_work, args.with_batch))
    workload = tidal.Reworded(make_workload(args, seed))

    async def sender(index: int, start: float) -> RequestRecord:
        return await send(client, target, workload.request(index), start)

    try:
        before = await tidal.lines_done(client, target, batch_id)
        records = await run_load(shape, sender, seed=seed, progress=not args.no_progress)
        done = await tidal.lines_done(client, target, batch_id) - before
    finally:
        await tidal.cancel_batch(client, target, batch_id)
    return records, tidal.BatchWindow(batch_id, done, done * args.output_len)


def _check(args: argparse.Namespace) -> None:
    """Mistakes that would otherwise surface only after a long sweep."""
    if not 0.0 < args.slo_attainment <= 1.0:
        raise ValueError(f"--slo-attainment must be in (0, 1], got {args.slo_attainment}")
    if args.price_per_hour is not None and args.price_per_hour < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    if args.from_results is None:
        make_workload(args, args.seed)  # a bad --prompts-file
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.with_batch is not None and (
        args.with_batch < 1 or args.sweep is not None or args.from_results is not None
    ):
        raise ValueError("--with-batch N needs N >= 1 and one load point (--request-rate or --concurrency)")
    if args.compare_routing:
        if args.with_batch is not None or args.sweep is not None or args.from_results is not None:
            raise ValueError("--compare-routing needs one load point (--request-rate or --concurrency)")
        if not args.admin_key:
            raise ValueError("--compare-routing switches the server's routing: give --admin-key")
        if args.workload == "jsonl":
            raise ValueError(
                "--compare-routing needs a synthetic workload (each run gets prompts of its own)"
            )


def _title(config: dict[str, Any]) -> str:
    workload = config["workload"]
    lengths = "" if workload == "jsonl" else f" ({config['input_len']} in / {config['output_len']} out)"
    return f"{config['model']} at {config['url']}: {workload} workload{lengths}"


def _report(
    config: dict[str, Any],
    measured: list[tuple[LoadShape, list[RequestRecord]]],
    args: argparse.Namespace,
    windows: list[tidal.BatchWindow] | None = None,
) -> dict[str, Any]:
    """Metrics and cost from the request logs; writes results.json (settings without the API key, the SLO,
    each point's metrics, its request log with --save-requests, the cost report), summary.md and the chart."""
    slo = Slo(args.slo_ttft, args.slo_tokens_per_s)
    points = [(shape.label, summarize(records, slo)) for shape, records in measured]
    if windows:
        points = [
            (f"{label} {'beside a batch' if n % 2 else 'alone'}, round {n // 2 + 1}", metrics)
            for n, (label, metrics) in enumerate(points)
        ]
    if config.get("compare_routing"):
        points = [
            (f"{label} {routing.POLICIES[n % 2]} routing, round {n // 2 + 1}", metrics)
            for n, (label, metrics) in enumerate(points)
        ]
    cost = None
    if args.price_per_hour is not None:
        cost = cost_report(points, args.price_per_hour, slo, args.slo_attainment)
    result = {
        "config": config,
        "slo": asdict(slo),
        "points": [
            {
                "label": label,
                "request_rate": shape.request_rate,
                "concurrency": shape.concurrency,
                "metrics": asdict(metrics),
                **({"requests": [asdict(r) for r in records]} if args.save_requests else {}),
            }
            for (label, metrics), (shape, records) in zip(points, measured, strict=True)
        ],
        "cost": None if cost is None else asdict(cost),
    }
    out = args.output_dir
    write_json(out / "results.json", result)
    summary = markdown_summary(points, slo, cost)
    (out / "summary.md").write_text(summary)
    plot_latency_vs_throughput(points, slo, out / "latency_vs_throughput.png", _title(config))
    print(summary)
    if windows:
        rounds = [tidal.compare(points[2 * n][1], points[2 * n + 1][1], w) for n, w in enumerate(windows)]
        write_json(out / "tidal.json", tidal.as_json(rounds))
        print("\n" + tidal.markdown(rounds))
    if config.get("compare_routing"):
        pairs = [routing.RoutingRound(points[n][1], points[n + 1][1]) for n in range(0, len(points), 2)]
        write_json(out / "routing.json", routing.as_json(pairs))
        print("\n" + routing.markdown(pairs))
    print(f"wrote {out}/results.json, summary.md, latency_vs_throughput.png", file=sys.stderr)
    return json.loads((out / "results.json").read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures (or, with --from-results, reads a saved run) and reports. Returns the results JSON as
    written (strict JSON: an infinite rate reads "inf")."""
    _check(args)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("run", "api_key", "admin_key", "from_results")
    }
    if args.from_results is not None:
        config, measured = load_run(args.from_results)
        reported = ("slo_ttft", "slo_tokens_per_s", "slo_attainment", "price_per_hour", "output_dir")
        config = {**config, **{key: settings[key] for key in reported}}
    else:
        target, measured, windows = asyncio.run(measure(args, load_shapes(args)))
        config = {**settings, "model": target.model, "url": target.url}
        return _report(config, measured, args, windows)
    return _report(config, measured, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="tokenmill bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
