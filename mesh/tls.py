"""Certificates of the mesh: a CA, one certificate per service or person, and the role in it.

``llorch certs init`` makes the CA; ``llorch certs issue --role R --name N`` makes a key and a
certificate signed by it. The role and name travel in the certificate as a URI subject
alternative name, ``spiffe://llama-orch/<role>/<name>`` (and as the subject's OU and CN, for
people reading it with openssl); a server reads them from the verified peer certificate of each
call (``identity_of_auth_context``) and checks the role against what the RPC allows (mesh.auth).

Keys are ECDSA P-256 (fast handshakes), written with mode 0600 in directories of mode 0700.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.ids import is_valid_name
from mesh.revocation import DENYLIST, Denylist, cert_id

ROLES = ("orchestrator", "poolmanager", "catalog", "operator", "client", "gateway", "metrics")
"""Roles a certificate can carry. ``gateway``: the REST edge's HTTPS certificate; no RPC
allows that role, so it is worth nothing on a service port. ``metrics``: a Prometheus scraper,
which may read /metrics (mesh.metrics) and call nothing."""
SERVICE_ROLES = frozenset({"orchestrator", "poolmanager", "catalog", "gateway"})
"""Roles whose certificates serve. Only these name ``localhost`` and ``127.0.0.1`` and may be
used by a server; the others (people, scrapers) authenticate as clients only, so a stolen
operator certificate cannot pose as a loopback service."""

URI_PREFIX = "spiffe://llama-orch/"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 397


class CertError(Exception):
    """A certificate could not be made or read; the message says what to do."""


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate names."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


@dataclass(frozen=True)
class TlsFiles:
    """The files one process uses: the CA it trusts, and its own certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    revoked: Path | None = None
    """The certificate denylist (mesh.revocation); None: ``revoked.txt`` beside ``ca``."""

    @property
    def denylist(self) -> Path:
        """The denylist file this process reads (it need not exist: then nothing is revoked)."""
        return self.revoked or self.ca.parent / DENYLIST


def init_ca(
    directory: Path, *, common_name: str = "llama-orch CA", days: int = DEFAULT_CA_DAYS
) -> Path:
    """Makes a CA in ``directory`` (``ca.pem``, ``ca.key``); returns the certificate's path.

    Raises:
        CertError: a CA is there already (it is never replaced: every certificate it signed
            would stop working).
    """
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise CertError(f"{directory} holds a CA already; remove {CA_CERT} and {CA_KEY} first")
    _private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    out_dir: Path,
    *,
    sans: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    not_before: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issues a key and certificate for ``role``/``name``, signed by the CA in ``ca_dir``;
    writes ``<name>.pem`` and ``<name>.key`` into ``out_dir`` and returns their paths.

    A service's certificate (``SERVICE_ROLES``) serves and calls, and names ``localhost`` and
    ``127.0.0.1``; ``sans`` adds DNS names and IP addresses. Any other role's certificate is
    for a client alone: no names, and an extended key usage of client authentication only, so
    TLS refuses it to a server. ``not_before`` (tests) backdates it.

    Raises:
        CertError: a bad role or name, no CA, or files of that name exist already.
    """
    if role not in ROLES:
        raise CertError(f"--role must be one of {', '.join(ROLES)}")
    if not is_valid_name(name):
        raise CertError(f"--name {name!r} must be a name like a model id (a-z, 0-9, '.', '_', '-')")
    if days < 1:
        raise CertError("--days must be at least 1")
    ca_cert, ca_key = _load_ca(ca_dir)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise CertError(f"{cert_path} or {key_path} exists already; remove them to issue again")
    serves = role in SERVICE_ROLES
    if sans and not serves:
        raise CertError(
            f"--san is for service certificates ({', '.join(sorted(SERVICE_ROLES))}); a "
            f"{role} certificate only calls, so it names no host"
        )
    alt_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"{URI_PREFIX}{role}/{name}")
    ]
    if serves:
        alt_names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for san in sans:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            if not san or any(c.isspace() for c in san):
                raise CertError(f"--san {san!r} is neither an IP address nor a DNS name") from None
            alt_names.append(x509.DNSName(san))
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if serves
                else [ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _private_dir(out_dir)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_credentials(files: TlsFiles, *, require_client_cert: bool) -> grpc.ServerCredentials:
    """Credentials of a server. ``require_client_cert``: mTLS (service ports), where a peer
    without a certificate from the CA fails the handshake; otherwise TLS only (the client port,
    where callers bring API keys)."""
    if files.cert is None or files.key is None:
        raise CertError("a TLS server needs its certificate and key (tls.cert_file, tls.key_file)")
    return grpc.ssl_server_credentials(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.ca),
        require_client_auth=require_client_cert,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials of a caller: trusts the CA; presents its certificate when it has one."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca),
        private_key=_read(files.key) if files.key else None,
        certificate_chain=_read(files.cert) if files.cert else None,
    )


def identity_of_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> Identity | None:
    """The role and name in the peer's certificate, from a call's ``auth_context()``: gRPC
    verified it against the CA during the handshake. None without a certificate or without our
    URI in it."""
    spiffe = auth_context.get("peer_spiffe_id")
    return identity_of_uri(spiffe[0].decode()) if spiffe else None


def identity_of_uri(uri: str) -> Identity | None:
    """``spiffe://llama-orch/<role>/<name>`` as an Identity; None for anything else."""
    if not uri.startswith(URI_PREFIX):
        return None
    role, _, name = uri.removeprefix(URI_PREFIX).partition("/")
    return Identity(role, name) if role in ROLES and is_valid_name(name) else None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"no CA in {ca_dir}; run `llorch certs init` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir / CA_KEY} is not a key `llorch certs init` made")
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Writes a new file readable by its owner alone (never briefly readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ServerCertificates:
    """Checks the certificates of the servers this process calls against the denylist.

    gRPC's Python API does not show a caller the certificate its server presented, so this
    fetches it with a TLS handshake of its own (presenting this process's certificate, which
    mTLS ports ask for). The orchestrator checks each pool manager's before watching it and
    again after every change of the denylist (orchestrator.pools), so a pool manager whose
    certificate is revoked gets no more work. A handshake that fails counts as revoked; one
    that cannot connect is asked again. The check's own connection may reach another backend
    than gRPC's behind a load balancer that spreads connections: dial pool managers directly.
    """

    def __init__(self, files: TlsFiles, server_name: str = "", timeout_s: float = 5.0) -> None:
        self._files = files
        self._server_name = server_name
        self._timeout_s = timeout_s
        self._denylist = Denylist(files.denylist)

    def generation(self) -> int:
        """Moves when the denylist changed."""
        return self._denylist.refresh()

    async def revoked(self, address: str) -> str | None:
        """Why the server at ``address`` may not be used (its certificate is revoked, or could
        not be verified), or None.

        Raises:
            OSError: it could not be reached (not a verdict: the caller asks again later).
        """
        try:
            der = await asyncio.to_thread(self._fetch, address)
        except _Unverified as exc:  # fails closed: a server that connects, then evades the check
            return f"the certificate of {address} could not be checked ({exc})"
        cert = cert_id(der)
        if not self._denylist.revoked(cert):
            return None
        return f"the certificate of {address} (serial {cert.serial_hex}) is revoked"

    def _fetch(self, address: str) -> bytes:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        context = ssl.create_default_context(cafile=str(self._files.ca))
        if self._files.cert is not None and self._files.key is not None:
            context.load_cert_chain(str(self._files.cert), str(self._files.key))
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=self._timeout_s) as raw:
            # Connected: from here on, any failure (refused handshake, reset, silence) is the
            # server's, and leaves it unverified.
            try:
                with context.wrap_socket(raw, server_hostname=self._server_name or host) as tls:
                    der = tls.getpeercert(binary_form=True)
            except OSError as exc:
                raise _Unverified(str(exc) or type(exc).__name__) from exc
        if der is None:
            raise _Unverified("no certificate")
        return der


class _Unverified(Exception):
    """A server that was reached presented no certificate this process could check."""
