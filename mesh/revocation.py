"""Revoked certificates: a denylist file that every TLS process reads again when it changes.

``llorch certs revoke`` appends a certificate's serial number to ``revoked.txt`` beside the CA
(``tls.revoked_file`` names another file). Operators ship that file with ``ca.pem``: a Secret
mount on Kubernetes, a copy on each machine otherwise. Each process checks the file's stamp at
most every ``refresh_s`` (1 s), so a revoked certificate is refused within a second or two of
the file reaching its machine. mesh.auth refuses new calls; mesh.interceptors ends the
streams such a peer has open.

The file holds one entry per line, ``#`` starting a comment:

- ``serial:<hex>``: the certificate's serial number, as ``openssl x509 -serial`` prints it
  (colons allowed);
- ``sha256:<hex>``: the SHA-256 of its DER bytes (``openssl x509 -fingerprint -sha256``).

A line that is neither is logged at ERROR naming the file and line, and skipped: it revokes
nothing, and the entries around it still count. A file that was read and then disappears
keeps its entries (logged at ERROR): to revoke nothing, empty the file. Replace the file by a
rename (``llorch certs revoke`` does), not by writing over it, so no reader sees it half
written.

This is a denylist rather than a CRL: the CA's key stays offline on the operator's machine,
and no process needs a CRL distribution point or OCSP responder to reach.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import logs

DENYLIST = "revoked.txt"
"""The denylist's file name beside ``ca.pem``, unless ``tls.revoked_file`` names another."""
DEFAULT_REFRESH_S = 1.0

_log = logs.get_logger("revocation")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class CertId:
    """What the denylist knows a certificate by."""

    serial: int
    sha256: str
    """Hex digest of the DER bytes, lower case, no colons."""

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "X")


def cert_id(der: bytes) -> CertId:
    """The serial and fingerprint of a DER certificate."""
    return CertId(
        x509.load_der_x509_certificate(der).serial_number, hashlib.sha256(der).hexdigest()
    )


@functools.lru_cache(maxsize=4096)
def cert_id_of_pem(pem: bytes) -> CertId:
    """The serial and fingerprint of a PEM certificate (cached: peers call again and again)."""
    cert = x509.load_pem_x509_certificate(pem)
    return CertId(
        cert.serial_number,
        hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


@dataclass(frozen=True)
class Entries:
    serials: frozenset[int] = frozenset()
    fingerprints: frozenset[str] = frozenset()

    def __contains__(self, cert: CertId) -> bool:
        return cert.serial in self.serials or cert.sha256 in self.fingerprints


def parse(text: str) -> tuple[Entries, list[str]]:
    """The entries of a denylist's text, and a message for each line that is no entry."""
    serials: set[int] = set()
    fingerprints: set[str] = set()
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(":")
        digits = value.strip().replace(":", "").lower()
        if kind == "serial" and _HEX.fullmatch(digits):
            serials.add(int(digits, 16))
        elif kind == "sha256" and len(digits) == 64 and _HEX.fullmatch(digits):
            fingerprints.add(digits)
        else:
            errors.append(
                f"line {number}: {line[:80]!r} is neither serial:<hex> nor sha256:<64 hex digits>"
            )
    return Entries(frozenset(serials), frozenset(fingerprints)), errors


class Denylist:
    """The revoked certificates of one file, read again when the file changes. Thread-safe:
    the gRPC servers ask from the event loop, the metrics endpoint from its threads."""

    def __init__(
        self,
        path: Path | None,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries = Entries()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self.generation = 0
        """Moves each time the entries change (mesh.interceptors sweeps open streams then)."""
        self._refresh(self._clock())

    def revoked(self, cert: CertId) -> bool:
        """Whether ``cert`` is on the list, as the file reads now (within ``refresh_s``)."""
        self.refresh()
        return cert in self._entries

    def refresh(self) -> int:
        """Reads the file again if it changed and ``refresh_s`` has passed; the generation."""
        now = self._clock()
        if now - self._checked_at >= self._refresh_s:
            with self._lock:
                if now - self._checked_at >= self._refresh_s:
                    self._refresh(now)
        return self.generation

    def _refresh(self, now: float) -> None:
        self._checked_at = now
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            if self._entries.serials or self._entries.fingerprints:
                # A list that was read and is gone (a deleted ConfigMap, a botched move): its
                # entries still stand; emptying the file is how to revoke nothing.
                if self._stamp != (0, 0, 0):
                    _log.error(
                        "the certificate denylist is gone; keeping the entries read last",
                        extra={"path": str(self.path)},
                    )
                    self._stamp = (0, 0, 0)
                return
            stamp, text = (0, 0, 0), ""  # no file yet: nothing is revoked
        except OSError as exc:
            # Unreadable now: the entries read last still stand (forgetting them would let
            # revoked certificates back in).
            _log.error(
                "cannot read the certificate denylist",
                extra={"path": str(self.path), "error": exc.strerror},
            )
            return
        entries, errors = parse(text)
        for error in errors:
            _log.error(
                "certificate denylist entry ignored", extra={"path": str(self.path), "error": error}
            )
        self._stamp = stamp
        if entries != self._entries:
            self._entries = entries
            self.generation += 1
            _log.info(
                "certificate denylist read",
                extra={
                    "path": str(self.path),
                    "serials": len(entries.serials),
                    "fingerprints": len(entries.fingerprints),
                },
            )


def append(path: Path, cert: CertId, note: str) -> bool:
    """Adds ``cert``'s serial to the denylist at ``path`` (made if missing); False when it was
    there already. ``note`` (who it was, why) goes in a comment.

    The file is replaced whole (written beside it, then renamed), so a process reading it
    never sees half a line, and a last line without its newline does not swallow the new one.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    if cert in parse(text)[0]:
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    note = " ".join(note.split())
    fingerprint = f"; sha256:{cert.sha256}" if cert.sha256 else ""
    text += f"serial:{cert.serial_hex}  # {note}{fingerprint}; revoked {when}\n"
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    return True
