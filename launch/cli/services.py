"""``llorch up`` and ``llorch serve``: run the home profile, or one service of a fleet."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from launch.cli.common import SERVICE
from mesh.settings import Settings, load_settings


def add_parsers(sub: Any) -> None:
    """Adds ``up`` and ``serve``."""
    up = sub.add_parser(
        "up",
        parents=[SERVICE],
        help="run the home profile (catalog, pool manager, orchestrator)",
    )
    up.set_defaults(run=_cmd_up)
    serve = sub.add_parser(
        "serve", parents=[SERVICE], help="run one service of the mesh in the foreground"
    )
    serve.add_argument("service", choices=["catalog", "poolmanager", "orchestrator"])
    serve.set_defaults(run=_cmd_serve)


def _service_settings(args: argparse.Namespace) -> Settings:
    """Settings of a service command (flags over environment over TOML), logging set up."""
    from mesh.logs import configure_logging

    config = args.config or (
        Path(os.environ["LLORCH_CONFIG"]) if "LLORCH_CONFIG" in os.environ else None
    )
    settings = load_settings(
        config, listen=args.listen, data_dir=args.data_dir, log_format=args.log_format
    )
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _cmd_up(args: argparse.Namespace) -> int:
    from launch.home import main_up
    from mesh import tracing

    settings = _service_settings(args)
    tracing.configure(settings.tracing, "llorch-home")
    try:
        return main_up(settings, dict(os.environ))
    finally:
        tracing.shutdown()


def _cmd_serve(args: argparse.Namespace) -> int:
    from launch.serve import main_serve
    from mesh import tracing

    settings = _service_settings(args)
    tracing.configure(settings.tracing, f"llorch-{args.service}")
    try:
        return main_serve(settings, args.service, dict(os.environ))
    finally:
        tracing.shutdown()
