"""Starts ``llorch up`` for a benchmark: its own process, a temporary data dir, loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_home(
    data_dir: Path,
    pools: list[dict[str, Any]],
    models: dict[str, Path] | None = None,
    **settings: str,
) -> tuple[subprocess.Popen[str], str]:
    """``llorch up`` with these pools (and extra model files); returns it and its orchestrator
    address. ``settings`` are more ``LLORCH_*`` variables (name without the prefix). Its log
    goes to ``<data_dir>/llorch-up.log``, shown if it fails to start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LLORCH_DATA_DIR": str(data_dir),
        "LLORCH_LISTEN": "127.0.0.1:0",
        "LLORCH_GATEWAY_LISTEN": "",  # the benchmarks measure gRPC; no REST edge
        "LLORCH_LOG_LEVEL": "WARNING",
        "LLORCH_MODELS": json.dumps({k: str(v) for k, v in (models or {}).items()}),
        "LLORCH_POOL_MANAGER__POOLS": json.dumps(pools),
        "GRPC_VERBOSITY": "ERROR",
        **{f"LLORCH_{name}": value for name, value in settings.items()},
    }
    log_path = data_dir / "llorch-up.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "up"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("llorch ready"):
        proc.kill()
        proc.wait()
        raise SystemExit(f"llorch up failed: {log_path.read_text()[-2000:]}")
    return proc, line.split()[3]


def stop_home(proc: subprocess.Popen[str]) -> None:
    """Stops ``llorch up`` as Ctrl-C would; kills it if it does not stop within a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
