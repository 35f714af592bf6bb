"""What every ``llorch`` command shares: the flags declared once, the client channel, and one way
to connect, call, print a table or JSON, and turn a failed call into one line and exit status 1.

Exit statuses: 0 done; 1 the call failed (``error: CODE: message`` on stderr) or a file it needs
could not be used; 2 a usage or settings mistake; 70 a bug (launch.cli.EXIT_BUG); 130
interrupted; 141 the reader of stdout went away. docs/operators.md has the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.errors import LlorchError
from mesh.settings import ClientSettings, ConfigError
from mesh.tls import channel_credentials


def _flags(*add: Callable[[argparse.ArgumentParser], object]) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for adder in add:
        adder(parent)
    return parent


ORCHESTRATOR = _flags(
    lambda p: p.add_argument("--orchestrator", help="orchestrator address (LLORCH_ORCHESTRATOR)")
)
"""``--orchestrator``: commands that call the orchestrator (``parents=[ORCHESTRATOR]``)."""
DATA_DIR = _flags(
    lambda p: p.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")
)
"""``--data-dir``: commands that read the home profile's data directory."""
CATALOG = _flags(
    lambda p: p.add_argument("--catalog", help="catalog address (LLORCH_CATALOG)"),
    lambda p: p.add_argument(
        "--data-dir", type=Path, help="home profile data dir (LLORCH_DATA_DIR)"
    ),
)
"""``--catalog`` and ``--data-dir`` (where ``llorch up`` recorded the catalog's address)."""
JSON = _flags(lambda p: p.add_argument("--json", action="store_true", help="print JSON"))
"""``--json``: print JSON instead of a table."""
SERVICE = _flags(
    lambda p: p.add_argument("--listen", help="orchestrator address (LLORCH_LISTEN)"),
    lambda p: p.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)"),
    lambda p: p.add_argument("--config", type=Path, help="TOML settings file (LLORCH_CONFIG)"),
    lambda p: p.add_argument(
        "--log-format", choices=["json", "text"], help="log format (LLORCH_LOG_FORMAT)"
    ),
)
"""The flags of the commands that run services (``up``, ``serve``)."""


def client_channel(address: str) -> grpc.aio.Channel:
    """A channel of the client commands: over TLS when ``LLORCH_CA_FILE`` is set (presenting
    ``LLORCH_CERT_FILE`` to mTLS service ports), with ``LLORCH_API_KEY`` on every call."""
    settings = ClientSettings()
    files = settings.tls_files()
    if files is None:
        return grpc.aio.insecure_channel(address)
    credentials = channel_credentials(files)
    if settings.api_key:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.api_key)
        )
    return grpc.aio.secure_channel(address, credentials)


def call(address: str, body: Callable[[grpc.aio.Channel], Awaitable[int | None]]) -> int:
    """Connects to ``address``, runs ``body`` on the channel and returns its exit status (None is
    0). A failed call, or a mesh error ``body`` raises, prints one line and returns 1."""

    async def run() -> int | None:
        async with client_channel(address) as channel:
            return await body(channel)

    try:
        return asyncio.run(run()) or 0
    except grpc.aio.AioRpcError as err:
        return failed(err.code().name, err.details() or "")
    except LlorchError as err:
        return failed(err.code.name, err.message)


def failed(code: str, message: str) -> int:
    """Prints ``error: CODE: message`` on stderr; returns exit status 1."""
    return fail(f"{code}: {message}")


def fail(message: str) -> int:
    """Prints ``error: message`` on stderr; returns exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def data_dir(args: argparse.Namespace) -> Path:
    """``--data-dir``, else ``LLORCH_DATA_DIR``, else the default data directory."""
    return Path(args.data_dir or ClientSettings().data_dir)


def orchestrator_address(args: argparse.Namespace) -> str:
    """``--orchestrator``, else ``LLORCH_ORCHESTRATOR``, else the default."""
    return str(args.orchestrator or ClientSettings().orchestrator)


def catalog_address(args: argparse.Namespace) -> str:
    """``--catalog``, else ``LLORCH_CATALOG``, else the address ``llorch up`` recorded."""
    client = ClientSettings()
    if args.catalog or client.catalog:
        return str(args.catalog or client.catalog)
    return home_endpoint(args, "catalog", "pass --catalog, set LLORCH_CATALOG, or run `llorch up`")


def home_endpoint(
    args: argparse.Namespace, name: str, hint: str = "pass it, or run `llorch up`"
) -> str:
    """A service address ``llorch up`` recorded in its data directory."""
    from launch.home import endpoints_path

    path = endpoints_path(args.data_dir or ClientSettings().data_dir)
    try:
        return str(json.loads(path.read_text())[name])
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"no {name} address: {hint} (which records it in {path})") from None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as aligned columns under upper-case headings."""
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints ``table(rows, columns)``."""
    print(table(rows, columns))


def print_messages(messages: Iterable[Message], *, lines: bool = False) -> None:
    """Messages as JSON: one indented array, or (``lines``) one object per line."""
    shown = [json_format.MessageToDict(m) for m in messages]
    if lines:
        for item in shown:
            print(json.dumps(item))
    else:
        print(json.dumps(shown, indent=2))


async def with_progress(label: str, method: Any, request: Any) -> Any:
    """Makes a long call, saying on stderr that it waits and for how long: a line that counts
    the seconds on a terminal, a line before and after otherwise."""
    started = time.monotonic()
    live = sys.stderr.isatty()
    if not live:
        print(f"{label} …", file=sys.stderr, flush=True)
    task = asyncio.ensure_future(method(request))
    while not task.done():
        if live:
            print(f"\r{label} … {time.monotonic() - started:.1f} s", end="", file=sys.stderr)
        await asyncio.wait({task}, timeout=0.5)
    ok = task.exception() is None
    end = "\r" if live else ""
    print(
        f"{end}{label}: {'done' if ok else 'failed'} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return task.result()


def non_negative_int(text: str) -> int:
    """A count flag: a whole number, at least 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 0")
    return int(text)


def seconds(text: str) -> float:
    """A duration flag: seconds, at least 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value
