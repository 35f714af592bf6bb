"""The ``llorch`` command: one module per command group, over launch/cli/common.py.

llorch up                              run the home profile in the foreground
llorch serve catalog|poolmanager|orchestrator   run one service (a fleet's processes)
llorch generate --model M "prompt"     stream tokens from the orchestrator
llorch chat MODEL [--system S] [--schema FILE] [--json]   a conversation, stdin lines as turns
llorch models list | add NAME PATH | pull REF | rm NAME | retire|activate|pin|unpin NAME
llorch engines check | list              this node's engine, and every node's recorded
llorch gc [--dry-run] | gc policy [...]   delete model files by policy; show or set the policy
llorch pools list | drain NODE/POOL | resume NODE/POOL   pools, for operators
llorch pools reload NODE/POOL MODEL | preload MODEL [--pool NODE/POOL]   change what pools hold
llorch nodes list | top                 the fleet, for operators
llorch tasks get ID | list             tasks' states
llorch certs init | issue; keys create | list | revoke   the cloud profile's credentials

Exit statuses: launch/cli/common.py.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

from launch.cli import (
    certs,
    chat,
    engines,
    gc,
    generate,
    keys,
    models,
    nodes,
    pools,
    services,
    tasks,
    top,
)
from mesh.settings import ConfigError

GROUPS = (services, generate, chat, models, gc, engines, top, nodes, pools, certs, keys, tasks)
"""The command groups, in the order ``llorch --help`` lists them."""


EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: the status a shell shows for a command whose reader closed the pipe."""
EXIT_BUG = 70
"""EX_SOFTWARE: llorch itself failed. One line says so; ``python -X dev -m launch.cli ...``
shows the traceback."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = parser_of_commands()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"llorch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        # A file or directory the command needs: name it, in one line.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a key or catalog file that cannot be opened or written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if sys.flags.dev_mode:
            raise
        print(
            f"llorch: internal error: {type(exc).__name__}: {exc} (a bug; rerun with "
            "`python -X dev -m launch.cli ...` for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_BUG


def _broken_pipe() -> int:
    """Whoever read our output went away (`llorch generate ... | head`): stop quietly, as a C
    tool killed by SIGPIPE would, and point stdout at /dev/null so that the interpreter's last
    flush does not complain either. The call was cancelled on the way out (its channel
    closed), so the task ends CANCELLED."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def parser_of_commands() -> argparse.ArgumentParser:
    """The ``llorch`` parser with every group's commands."""
    parser = argparse.ArgumentParser(prog="llorch", description="llama-orch: LLM inference mesh")
    sub = parser.add_subparsers(title="commands")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser
