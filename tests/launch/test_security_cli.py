"""``llorch certs`` and ``llorch keys`` as an operator runs them, and the refusal to listen off
loopback without TLS."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mesh.tls import identity_of_uri
from tests.e2e.helpers import run_llorch


def test_certs_make_a_ca_and_role_certificates_with_private_keys(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    made = run_llorch("certs", "init", "--dir", str(ca_dir))
    assert made.returncode == 0, made.stderr
    again = run_llorch("certs", "init", "--dir", str(ca_dir))
    assert again.returncode == 1 and "holds a CA already" in again.stderr
    issued = run_llorch(
        "certs", "issue", "--role", "poolmanager", "--name", "gpu-node-1",
        "--san", "10.0.0.5", "--san", "gpu1.example", "--dir", str(ca_dir),
        "--out", str(tmp_path / "node"),
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    key = tmp_path / "node" / "gpu-node-1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "node").stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate((tmp_path / "node" / "gpu-node-1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    assert [str(identity_of_uri(u)) for u in uris] == ["poolmanager/gpu-node-1"]
    assert "gpu1.example" in sans.get_values_for_type(x509.DNSName)
    assert "10.0.0.5" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    for bad in (["--role", "root", "--name", "x"], ["--role", "client", "--name", "../etc"]):
        refused = run_llorch("certs", "issue", *bad, "--dir", str(ca_dir))
        assert refused.returncode != 0


def test_keys_are_shown_once_listed_by_fingerprint_and_revoked(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    created = run_llorch(
        "keys", "create", "--tenant", "team-a", "--models", "tiny-llama,other",
        "--rate", "5", "--keys-db", db,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("llk_") and len(key) == 4 + 12 + 1 + 43
    fingerprint, secret = key[: 4 + 12], key[4 + 12 + 1 :]
    assert secret.isalnum()  # one double-click selects the whole key
    listed = run_llorch("keys", "list", "--json", "--keys-db", db)
    assert key not in listed.stdout and secret not in listed.stdout
    record = json.loads(listed.stdout)
    assert record["key"] == fingerprint and record["tenant"] == "team-a"
    assert record["models"] == ["other", "tiny-llama"] and record["revoked"] == ""
    assert run_llorch("keys", "revoke", fingerprint, "--keys-db", db).returncode == 0
    table = run_llorch("keys", "list", "--keys-db", db).stdout
    assert table.splitlines()[0].split()[0] == "KEY" and fingerprint in table
    after = json.loads(run_llorch("keys", "list", "--json", "--keys-db", db).stdout)
    assert after["revoked"].endswith("Z")
    stored = (tmp_path / "keys.db").read_bytes()
    assert secret.encode() not in stored  # only the hash is kept
    for made in tmp_path.glob("keys.db*"):  # the -wal and -shm files too
        assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
    unknown = run_llorch("keys", "revoke", "llk_000000000000", "--keys-db", db)
    assert unknown.returncode == 1 and "no key" in unknown.stderr


def test_a_service_refuses_to_listen_off_loopback_without_tls(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "launch.cli", "serve", "catalog", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"LLORCH_CATALOG_SERVICE__LISTEN": "0.0.0.0:0", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without TLS" in refused.stderr
    assert "tls.ca_file" in refused.stderr and "llorch certs" in refused.stderr


async def test_probes_get_plaintext_health_and_nothing_else(tmp_path: Path) -> None:
    import asyncio
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from llorch.catalog.v1 import catalog_pb2, catalog_pb2_grpc

    from tests.e2e.helpers import start_llorch
    from tests.e2e.secure_mesh import Pki

    pki = Pki(tmp_path / "pki")
    files = pki.files("catalog")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        probe_port = s.getsockname()[1]
    proc, address = await asyncio.to_thread(
        start_llorch,
        ["serve", "catalog", "--data-dir", str(tmp_path / "catalog")],
        {
            "LLORCH_TLS__CA_FILE": str(files.ca),
            "LLORCH_TLS__CERT_FILE": str(files.cert),
            "LLORCH_TLS__KEY_FILE": str(files.key),
            "LLORCH_HEALTH_LISTEN": f"0.0.0.0:{probe_port}",  # off loopback: health only
            "GRPC_VERBOSITY": "ERROR",
        },
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "llorch.catalog.v1.CatalogService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as nothing_else:
                await catalog_pb2_grpc.CatalogServiceStub(channel).ListModels(
                    catalog_pb2.ListModelsRequest()
                )
            assert nothing_else.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(address) as channel:  # the real port: TLS only
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(timeout=30)
