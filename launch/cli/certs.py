"""``llorch certs``: the cloud profile's CA, the certificates it issues (mTLS), and the
denylist of those revoked (mesh.revocation).

Acts on local files, on the machine that holds the CA: its directory (``<data dir>/certs`` by
default).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography import x509

from launch.cli.common import DATA_DIR, data_dir, fail
from mesh.revocation import DENYLIST, CertId, append, cert_id_of_pem
from mesh.tls import DEFAULT_DAYS, ROLES, CertError, identity_of_uri, init_ca, issue


def add_parsers(sub: Any) -> None:
    """Adds ``certs init``, ``certs issue`` and ``certs revoke``."""
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
        help="DNS name or IP the service is reached at (repeat; service roles only, which "
        "always name localhost and 127.0.0.1)",
    )
    cissue.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    cissue.add_argument("--dir", type=Path, help="CA directory (default: <data dir>/certs)")
    cissue.add_argument("--out", type=Path, help="where to write (default: the CA directory)")
    cissue.set_defaults(run=_cmd_certs_issue)
    crevoke = certs_sub.add_parser(
        "revoke",
        parents=[DATA_DIR],
        help="put a certificate on the denylist every service reads (within seconds)",
    )
    which = crevoke.add_mutually_exclusive_group(required=True)
    which.add_argument("cert", nargs="?", type=Path, help="the certificate file (<name>.pem)")
    which.add_argument("--serial", help="its serial number in hex, when the file is gone")
    crevoke.add_argument("--dir", type=Path, help="CA directory (default: <data dir>/certs)")
    crevoke.add_argument(
        "--file", type=Path, help=f"the denylist (default: {DENYLIST} in the CA directory)"
    )
    crevoke.set_defaults(run=_cmd_certs_revoke)


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


def _cmd_certs_revoke(args: argparse.Namespace) -> int:
    directory = args.dir or data_dir(args) / "certs"
    denylist = args.file or directory / DENYLIST
    if args.cert is not None:
        try:
            pem = args.cert.read_bytes()
            cert = cert_id_of_pem(pem)
        except OSError as exc:
            return fail(f"cannot read {args.cert}: {exc.strerror}")
        except ValueError:
            return fail(f"{args.cert} is not a PEM certificate")
        note = _describe(pem)
    else:
        digits = args.serial.replace(":", "").strip().lower()
        if not digits or any(c not in "0123456789abcdef" for c in digits):
            return fail(f"--serial {args.serial!r} is not a hex number")
        serial = int(digits, 16)
        cert, note = CertId(serial, ""), "by serial"
    if not denylist.parent.is_dir():
        return fail(f"no directory {denylist.parent}; give the CA directory with --dir")
    added = append(denylist, cert, note)
    state = "revoked" if added else "already revoked"
    print(
        f"{note}: serial {cert.serial_hex} {state} in {denylist}; copy it to every machine "
        "beside ca.pem (services read it within seconds)"
    )
    return 0


def _describe(pem: bytes) -> str:
    """``role/name`` of a certificate, for the denylist's comment."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "a certificate without a llama-orch role"
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        identity = identity_of_uri(uri)
        if identity is not None:
            return str(identity)
    return "a certificate without a llama-orch role"
