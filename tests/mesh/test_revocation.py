"""The certificate denylist: what a line may say, that a change is read within the refresh
time and only then, that a bad line revokes nothing but spoils nothing else, and what
``llorch certs revoke`` writes; client certificates that name no host and cannot serve."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.revocation import Denylist, append, cert_id_of_pem, parse
from mesh.server import create_server, open_channel, service_security
from mesh.tls import issue
from tests.e2e.helpers import run_llorch
from tests.e2e.secure_mesh import Pki


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _touch(path: Path, text: str) -> None:
    """Writes ``text`` and moves the file's stamp on, as a later copy would."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_entries_are_serials_or_fingerprints_and_bad_lines_are_named() -> None:
    fp = "AB:" * 31 + "CD"
    entries, errors = parse(
        f"# revoked\nserial:0F:a0  # bob\nsha256:{fp}\n\nserial:zz\nsha256:abc\nfoo\n"
    )
    assert entries.serials == {0x0FA0}
    assert entries.fingerprints == {fp.replace(":", "").lower()}
    assert [e.split(":")[0] for e in errors] == ["line 5", "line 6", "line 7"]


def test_a_change_is_read_within_the_refresh_time(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    bob = cert_id_of_pem((pki.root / "certs" / "bob.pem").read_bytes())
    alice = cert_id_of_pem((pki.root / "certs" / "alice.pem").read_bytes())
    path = tmp_path / "revoked.txt"
    clock = Clock()
    denylist = Denylist(path, refresh_s=1.0, clock=clock)  # no file yet: nothing revoked
    assert not denylist.revoked(bob)
    generation = denylist.generation
    _touch(path, f"serial:{bob.serial_hex}\n")
    clock.now = 0.5
    assert not denylist.revoked(bob)  # not looked at again yet
    clock.now = 1.0
    assert denylist.revoked(bob) and not denylist.revoked(alice)
    assert denylist.generation == generation + 1
    _touch(path, f"sha256:{alice.sha256}\n")
    clock.now = 2.0
    assert denylist.revoked(alice) and not denylist.revoked(bob)  # taken off: allowed again
    _touch(path, "")
    clock.now = 3.0
    assert not denylist.revoked(alice)


def test_a_bad_line_is_logged_and_the_others_still_revoke(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path / "pki")
    bob = cert_id_of_pem((pki.root / "certs" / "bob.pem").read_bytes())
    path = tmp_path / "revoked.txt"
    path.write_text(f"serial {bob.serial_hex}\nserial:{bob.serial_hex}\n")
    with caplog.at_level(logging.ERROR):
        assert Denylist(path).revoked(bob)
    assert any("line 1" in str(r.__dict__.get("error")) for r in caplog.records)


def test_append_adds_a_certificate_once(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    bob = cert_id_of_pem((pki.root / "certs" / "bob.pem").read_bytes())
    path = tmp_path / "revoked.txt"
    assert append(path, bob, "client/bob")
    assert not append(path, bob, "client/bob")
    entries, errors = parse(path.read_text())
    assert bob in entries and not errors
    assert path.read_text().count("\n") == 1 and "client/bob" in path.read_text()


def test_llorch_certs_revoke_writes_the_denylist_beside_the_ca(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ca_dir = pki.root / "ca"
    pem = pki.root / "certs" / "bob.pem"
    bob = cert_id_of_pem(pem.read_bytes())
    done = run_llorch("certs", "revoke", str(pem), "--dir", str(ca_dir))
    assert done.returncode == 0, done.stderr
    assert "client/bob" in done.stdout and bob.serial_hex in done.stdout
    assert bob in parse((ca_dir / "revoked.txt").read_text())[0]
    again = run_llorch("certs", "revoke", "--serial", bob.serial_hex.lower(), "--dir", str(ca_dir))
    assert again.returncode == 0 and "already revoked" in again.stdout
    for bad, says in (
        (["--serial", "xyz"], "not a hex number"),
        (["--serial=-1f"], "not a hex number"),
        ([str(tmp_path / "missing.pem")], "cannot read"),
        ([str(ca_dir / "ca.key")], "not a PEM certificate"),
    ):
        refused = run_llorch("certs", "revoke", *bad, "--dir", str(ca_dir))
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_client_certificates_name_no_host_and_are_for_clients_only(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    for name, serves in (("alice", False), ("bob", False), ("prometheus", False), ("orch", True)):
        cert = x509.load_pem_x509_certificate((pki.root / "certs" / f"{name}.pem").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert bool(sans.get_values_for_type(x509.DNSName)) == serves, name
        assert bool(sans.get_values_for_type(x509.IPAddress)) == serves, name
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usage) == serves, name
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    with pytest.raises(Exception, match="service certificates"):
        issue(pki.root / "ca", "operator", "eve", pki.root / "certs", sans=("localhost",))


async def test_an_operator_certificate_cannot_serve_even_on_loopback(tmp_path: Path) -> None:
    """Posing as a loopback service with a person's certificate fails the caller's handshake."""
    pki = Pki(tmp_path / "pki")
    for name, serves in (("alice", False), ("catalog", True)):
        credentials, authorize = service_security(pki.files(name))
        server = await create_server(
            "127.0.0.1:0", [], credentials=credentials, authorize=authorize
        )
        channel = open_channel(f"localhost:{server.port}", tls=pki.files("orch"))
        try:
            call = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            if serves:
                assert (await call).status == health_pb2.HealthCheckResponse.SERVING
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await channel.close()
            await server.stop(0)


def test_append_survives_a_last_line_without_newline_and_a_gone_file_keeps_its_entries(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    bob = cert_id_of_pem((pki.root / "certs" / "bob.pem").read_bytes())
    alice = cert_id_of_pem((pki.root / "certs" / "alice.pem").read_bytes())
    path = tmp_path / "revoked.txt"
    path.write_text(f"serial:{bob.serial_hex}")  # hand-written, no newline at the end
    assert append(path, alice, "operator/alice")
    entries, errors = parse(path.read_text())
    assert bob in entries and alice in entries and not errors
    clock = Clock()
    denylist = Denylist(path, clock=clock)
    assert denylist.revoked(bob)
    path.unlink()  # a deleted ConfigMap must not let every revoked certificate back in
    clock.now = 5.0
    assert denylist.revoked(bob)
    _touch(path, "")  # emptied on purpose: nothing is revoked
    clock.now = 10.0
    assert not denylist.revoked(bob)
