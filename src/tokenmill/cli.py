"""`tokenmill <command>`: argv -> configs -> one call. No logic lives here; a command is a row in `COMMANDS`
(its flags and the function it calls), so `admin` and `bench` plug in beside `serve`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import default_data_dir, default_database_url
from tokenmill.serving import serve_command
from tokenmill.serving.serve_command import DEFAULT_CHAT_MODEL, byte_size, engine_kwargs
from tokenmill.terminal import cluster as cluster_command


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="unique among the workers sharing the database (default: HOST:PID)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where job artifacts go")
    parser.add_argument("--database-url", default=default_database_url(), help="the servers' database")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _worker(args: argparse.Namespace) -> int:
    from tokenmill.jobs.trainer_worker import run_worker_process  # not needed for the other commands

    return run_worker_process(args.data_dir, args.database_url, args.name, log_level=args.log_level)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenmill.bench import decode, offline, quality, serve

    modes = parser.add_subparsers(dest="bench_mode", required=True, metavar="mode")
    offline_parser = modes.add_parser("offline", help="tokenmill vs transformers generate, same requests")
    offline.add_arguments(offline_parser)
    offline_parser.set_defaults(run=offline.run)
    decode_parser = modes.add_parser(
        "decode", help="single-stream decode tokens/s, C kernels vs torch ops, against the bandwidth roofline"
    )
    decode.add_arguments(decode_parser)
    decode_parser.set_defaults(run=decode.run)
    quality_parser = modes.add_parser(
        "quality", help="perplexity of a fixed text, the model as loaded vs quantized, in one run"
    )
    quality.add_arguments(quality_parser)
    quality_parser.set_defaults(run=quality.run)
    serve_parser = modes.add_parser("serve", help="load-test any OpenAI-compatible endpoint")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenmill.platform import admin_cli

    admin_cli.add_arguments(parser)


# -- chat ------------------------------------------------------------------------------------------


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        metavar="URL",
        help="chat with a running server, e.g. http://127.0.0.1:8000/v1 (default: load --model here)",
    )
    parser.add_argument("--api-key", help="for --base-url (default: $TOKENMILL_KEY, then $OPENAI_API_KEY)")
    parser.add_argument(
        "--model",
        metavar="ID|PATH",
        help=f"with --base-url a model id (default: the server's first chat model); without it an HF "
        f"directory, .gguf file or built-in name (default: {DEFAULT_CHAT_MODEL})",
    )
    parser.add_argument("--system", metavar="TEXT", help="system prompt (change it with /system)")
    parser.add_argument("--temperature", type=float, default=0.7, help="default: 0.7")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default: 512)")
    engine = parser.add_argument_group("engine (a model loaded here, without --base-url)")
    engine.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    engine.add_argument("--kv-cache-memory", type=byte_size, help="bytes for the KV cache, e.g. 512M")
    engine.add_argument("--device", help="auto, cpu or cuda[:N]")
    engine.add_argument("--seed", type=int, help="seed for sampling")


def _chat(args: argparse.Namespace) -> int:
    from tokenmill.terminal.chat import ChatOptions, run_chat  # httpx, and torch for a local model

    local_engine = engine_kwargs(args)
    options = ChatOptions(
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        system=args.system,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        engine_kwargs=local_engine,
    )
    return run_chat(options)


COMMANDS: list[Command] = [
    Command("serve", "run the OpenAI-compatible API server", serve_command.add_arguments, serve_command.run),
    Command(
        "admin", "manage organizations, users, keys, prices and balances", _admin_arguments, lambda args: 2
    ),
    Command("bench", "measure throughput and latency", _bench_arguments, lambda args: 2),
    Command("chat", "talk to a model in the terminal", _chat_arguments, _chat),
    Command("worker", "run fine-tuning jobs from the servers' database", _worker_arguments, _worker),
    Command(
        "cluster",
        "a running server's nodes and replicas; drain a replica or a node",
        cluster_command.add_arguments,
        cluster_command.run,
    ),
    Command(
        "doctor",
        "check this machine and show what serve would use (takes serve's flags)",
        serve_command.add_arguments,
        serve_command.run_doctor_command,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill", description="A self-hostable Model-as-a-Service platform."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        sub = subcommands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _tolerant_output() -> None:
    """Text from the command line or read back from a database may not be encodable for this terminal: it is
    printed escaped rather than stopping a listing half-way with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _tolerant_output()
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        return status if isinstance(status, int) else 0
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, ModelLoadError: messages name the fix
        print(f"tokenmill {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
