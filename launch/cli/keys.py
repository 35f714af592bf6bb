"""``llorch certs`` and ``llorch keys``: the CA, certificates, and API keys of the cloud profile.

Both act on local files, on the machine that holds them: the CA's directory
(``<data dir>/certs`` by default) and the orchestrator's key file
(``<data dir>/orchestrator/keys.db``), which the running orchestrator re-reads by itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from mesh.apikeys import KEY_ROLES, ApiKeyError, ApiKeyStore
from mesh.settings import ClientSettings
from mesh.tls import DEFAULT_DAYS, ROLES, CertError, init_ca, issue


def add_parsers(sub: Any) -> None:
    """Adds ``certs`` and ``keys`` to the ``llorch`` command's subparsers."""
    certs = sub.add_parser("certs", help="the mesh's CA and certificates (mTLS)")
    certs_sub = certs.add_subparsers(title="certs commands")
    cinit = certs_sub.add_parser("init", help="make a CA (ca.pem, ca.key)")
    cinit.add_argument("--dir", type=Path, help="CA directory (default: <data dir>/certs)")
    cinit.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")
    cinit.set_defaults(run=_cmd_certs_init)
    cissue = certs_sub.add_parser("issue", help="issue a key and certificate for a role")
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
    cissue.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")
    cissue.set_defaults(run=_cmd_certs_issue)

    keys = sub.add_parser("keys", help="API keys of clients and operators")
    keys_sub = keys.add_subparsers(title="keys commands")
    kcreate = keys_sub.add_parser("create", help="make a key (printed once)")
    kcreate.add_argument("--tenant", required=True, help="the key's tenant")
    kcreate.add_argument("--role", choices=KEY_ROLES, default="client")
    kcreate.add_argument("--models", default="", help="comma-separated model ids it may use")
    kcreate.add_argument("--rate", type=float, default=0.0, help="tasks/s it may submit (0: any)")
    kcreate.add_argument("--description", default="")
    kcreate.set_defaults(run=_cmd_keys, action="create")
    klist = keys_sub.add_parser("list", help="list keys (never their secrets)")
    klist.add_argument("--json", action="store_true", help="one JSON object per key")
    klist.set_defaults(run=_cmd_keys, action="list")
    krevoke = keys_sub.add_parser("revoke", help="revoke a key; it stops working within a second")
    krevoke.add_argument("key_id", help="the key's id (llk_… as `keys list` shows it)")
    krevoke.set_defaults(run=_cmd_keys, action="revoke")
    for parser in (kcreate, klist, krevoke):
        parser.add_argument(
            "--keys-db", type=Path, help="key file (default: <data dir>/orchestrator/keys.db)"
        )
        parser.add_argument("--data-dir", type=Path, help="data directory (LLORCH_DATA_DIR)")


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or ClientSettings().data_dir)


def _cmd_certs_init(args: argparse.Namespace) -> int:
    directory = args.dir or _data_dir(args) / "certs"
    try:
        path = init_ca(directory)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CA: {path} (its key {directory / 'ca.key'} stays on this machine, mode 0600)")
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    directory = args.dir or _data_dir(args) / "certs"
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
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.role}/{args.name}: {cert} and {key} (mode 0600); trust {directory / 'ca.pem'}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    path = args.keys_db or _data_dir(args) / "orchestrator" / "keys.db"
    store = ApiKeyStore(path)
    try:
        if args.action == "create":
            models = tuple(m.strip() for m in args.models.split(",") if m.strip())
            secret, key = store.create(args.tenant, args.role, models, args.rate, args.description)
            print(secret)
            print(
                f"{key.fingerprint}: tenant {key.tenant}, role {key.role}; keep the key above, "
                "it is not shown again",
                file=sys.stderr,
            )
        elif args.action == "list":
            rows = store.list()
            if args.json:
                for key in rows:
                    print(json.dumps(_key_json(key)))
            else:
                _print_keys(rows)
        else:
            key = store.revoke(args.key_id)
            print(f"{key.fingerprint}: revoked")
    except ApiKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _key_json(key: Any) -> dict[str, Any]:
    return {
        "key": key.fingerprint,
        "tenant": key.tenant,
        "role": key.role,
        "models": list(key.models),
        "rate_per_s": key.rate_per_s,
        "description": key.description,
        "created": _when(key.created_unix_s),
        "revoked": _when(key.revoked_unix_s) if key.revoked_unix_s else "",
    }


def _print_keys(keys: list[Any]) -> None:
    rows = [_key_json(k) for k in keys]
    columns = ["key", "tenant", "role", "models", "rate_per_s", "created", "revoked"]
    cells = [[c.upper() for c in columns]] + [
        [",".join(r[c]) if c == "models" else str(r[c]) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return ""
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
