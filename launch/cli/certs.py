"""``llorch certs``: the cloud profile's CA and the certificates it issues (mTLS).

Acts on local files, on the machine that holds the CA: its directory (``<data dir>/certs`` by
default).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from launch.cli.common import DATA_DIR, data_dir, fail
from mesh.tls import DEFAULT_DAYS, ROLES, CertError, init_ca, issue


def add_parsers(sub: Any) -> None:
    """Adds ``certs init`` and ``certs issue``."""
    certs = sub.add_parser("certs", help="the mesh's CA and certificates (mTLS)")
    certs_sub = certs.add_subparsers(title="certs commands")
    cinit = certs_sub.add_parser("init", parents=[DATA_DIR], help="make a CA (ca.pem, ca.key)")
    cinit.add_argument("--dir", type=Path, help="CA directory (default: <data dir>/certs)")
    cinit.set_defaults(run=_cmd_certs_init)
    cissue = certs_sub.add_parser(
        "issue", parents=[DATA_DIR], help="issue a key and certificate for a role"
    )
    cissue.add_argument("--role", required=True, choices=ROLES)
    cissue.add_argument("--name", required=True, help="service or person (like a model id)")
    cissue.add_argument(
        "--san",
        action="append",
        default=[],
        help="DNS name or IP the service is reached at (repeat; localhost is always in)",
    )
    cissue.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    cissue.add_argument("--dir", type=Path, help="CA directory (default: <data dir>/certs)")
    cissue.add_argument("--out", type=Path, help="where to write (default: the CA directory)")
    cissue.set_defaults(run=_cmd_certs_issue)


def _cmd_certs_init(args: argparse.Namespace) -> int:
    directory = args.dir or data_dir(args) / "certs"
    try:
        path = init_ca(directory)
    except CertError as exc:
        return fail(str(exc))
    print(f"CA: {path} (its key {directory / 'ca.key'} stays on this machine, mode 0600)")
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    directory = args.dir or data_dir(args) / "certs"
    try:
        cert, key = issue(
            directory,
            args.role,
            args.name,
            args.out or directory,
            sans=tuple(args.san),
            days=args.days,
        )
    except CertError as exc:
        return fail(str(exc))
    print(f"{args.role}/{args.name}: {cert} and {key} (mode 0600); trust {directory / 'ca.pem'}")
    return 0
