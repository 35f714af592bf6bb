"""``llorch keys``: the API keys of the cloud profile's clients and operators.

Acts on a local file, on the machine that holds it: the orchestrator's key file
(``<data dir>/orchestrator/keys.db`` by default), which the running orchestrator re-reads by
itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from launch.cli.common import DATA_DIR, JSON, data_dir, fail, print_table
from mesh.apikeys import KEY_ROLES, ApiKeyError, ApiKeyStore


def add_parsers(sub: Any) -> None:
    """Adds ``keys create|list|revoke``."""
    keys_file = argparse.ArgumentParser(add_help=False, parents=[DATA_DIR])
    keys_file.add_argument(
        "--keys-db", type=Path, help="key file (default: <data dir>/orchestrator/keys.db)"
    )
    keys = sub.add_parser("keys", help="API keys of clients and operators")
    keys_sub = keys.add_subparsers(title="keys commands")
    kcreate = keys_sub.add_parser("create", parents=[keys_file], help="make a key (printed once)")
    kcreate.add_argument("--tenant", required=True, help="the key's tenant")
    kcreate.add_argument("--role", choices=KEY_ROLES, default="client")
    kcreate.add_argument("--models", default="", help="comma-separated model ids it may use")
    kcreate.add_argument("--rate", type=float, default=0.0, help="tasks/s it may submit (0: any)")
    kcreate.add_argument("--description", default="")
    kcreate.set_defaults(run=_cmd_keys, action="create")
    klist = keys_sub.add_parser(
        "list",
        parents=[keys_file, JSON],
        help="list keys, never their secrets (JSON: a line each)",
    )
    klist.set_defaults(run=_cmd_keys, action="list")
    krevoke = keys_sub.add_parser(
        "revoke", parents=[keys_file], help="revoke a key; it stops working within a second"
    )
    krevoke.add_argument("key_id", help="the key's id (llk_… as `keys list` shows it)")
    krevoke.set_defaults(run=_cmd_keys, action="revoke")


def _cmd_keys(args: argparse.Namespace) -> int:
    path = args.keys_db or data_dir(args) / "orchestrator" / "keys.db"
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
        return fail(str(exc))
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
    for row in rows:
        row["models"] = ",".join(row["models"])
    print_table(rows, ["key", "tenant", "role", "models", "rate_per_s", "created", "revoked"])


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return ""
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
