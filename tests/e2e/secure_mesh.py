"""A mesh with the cloud profile's security: a CA, one certificate per service, mTLS between
services, TLS and API keys on the orchestrator's client port. Every server really listens on a
loopback port with real TLS; the three services run in this event loop (tests/e2e/test_auth.py),
and as separate processes where a test needs that."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from llorch.catalog.v1 import catalog_pb2_grpc

from catalog.app import CatalogApp, start_catalog
from mesh.apikeys import ApiKeyStore
from mesh.revocation import DENYLIST, append, cert_id_of_pem
from mesh.server import open_channel
from mesh.settings import (
    CatalogSettings,
    OrchestratorSettings,
    PoolManagerSettings,
    PoolSettings,
    Settings,
    TlsSettings,
)
from mesh.tls import TlsFiles, channel_credentials, init_ca, issue
from orchestrator.app import OrchestratorApp, start_orchestrator
from poolmanager.app import PoolManagerApp, start_pool_manager
from provisioners.models import register_local_file
from provisioners.tiny_model import DEFAULT_MODEL_ID


@dataclass
class Pki:
    """A CA with a certificate per role, plus the certificates that must be refused."""

    root: Path
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        init_ca(self.root / "ca")
        self.ca = self.root / "ca" / "ca.pem"
        for role, name in [
            ("catalog", "catalog"),
            ("poolmanager", "node-a"),
            ("orchestrator", "orch"),
            ("operator", "alice"),
            ("client", "bob"),
            ("metrics", "prometheus"),
            ("operator", "mallory"),
        ]:
            issue(self.root / "ca", role, name, self.root / "certs")
        # Refused by every service: mallory's certificate is on the denylist beside the CA.
        self.revoke("mallory")
        # Refused in the handshake: another CA's certificate, and an expired one of ours.
        init_ca(self.root / "other-ca")
        issue(self.root / "other-ca", "orchestrator", "orch", self.root / "other")
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        issue(
            self.root / "ca",
            "orchestrator",
            "expired",
            self.root / "certs",
            days=1,
            not_before=long_ago,
        )

    def revoke(self, name: str) -> None:
        """Puts certificate ``name`` on the denylist every process of the mesh reads."""
        pem = (self.root / "certs" / f"{name}.pem").read_bytes()
        append(self.root / "ca" / DENYLIST, cert_id_of_pem(pem), f"test: {name}")

    def files(self, name: str, *, other_ca: bool = False) -> TlsFiles:
        """TLS files of the certificate ``name`` (``other_ca``: the foreign CA's)."""
        folder = self.root / ("other" if other_ca else "certs")
        return TlsFiles(self.ca, folder / f"{name}.pem", folder / f"{name}.key")

    def env(self, name: str) -> dict[str, str]:
        """The ``LLORCH_TLS__*`` variables of a process with certificate ``name``."""
        files = self.files(name)
        return {
            "LLORCH_TLS__CA_FILE": str(files.ca),
            "LLORCH_TLS__CERT_FILE": str(files.cert),
            "LLORCH_TLS__KEY_FILE": str(files.key),
        }

    def settings(self, name: str) -> TlsSettings:
        files = self.files(name)
        return TlsSettings(ca_file=files.ca, cert_file=files.cert, key_file=files.key)

    def channel(
        self, address: str, name: str | None, *, other_ca: bool = False
    ) -> grpc.aio.Channel:
        """A channel presenting certificate ``name`` (None: none) and trusting our CA."""
        files = self.files(name, other_ca=other_ca) if name else TlsFiles(self.ca)
        return grpc.aio.secure_channel(address, channel_credentials(files))

    def key_channel(self, address: str, key: str | None) -> grpc.aio.Channel:
        """A TLS channel to a client port, sending ``key`` as the bearer token (None: none)."""
        credentials = channel_credentials(TlsFiles(self.ca))
        if key is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(key)
            )
        return grpc.aio.secure_channel(address, credentials)


@dataclass
class SecureMesh:
    pki: Pki
    catalog: CatalogApp
    pool_manager: PoolManagerApp
    orchestrator: OrchestratorApp
    keys: ApiKeyStore

    @property
    def orchestrator_address(self) -> str:
        return f"localhost:{self.orchestrator.port}"

    @property
    def catalog_address(self) -> str:
        return f"localhost:{self.catalog.server.port}"

    @property
    def node_port_address(self) -> str:
        assert self.orchestrator.node_server is not None
        return f"localhost:{self.orchestrator.node_server.port}"

    @property
    def pool_manager_address(self) -> str:
        return f"localhost:{self.pool_manager.server.port}"

    async def stop(self) -> None:
        await self.orchestrator.stop()
        await self.pool_manager.stop()
        await self.catalog.stop()
        self.keys.close()


async def start_secure_mesh(root: Path, model_path: Path) -> SecureMesh:
    """Catalog, pool manager (one CPU pool of the tiny model) and orchestrator, all with TLS."""
    pki = Pki(root / "pki")
    catalog = await start_catalog(
        Settings(
            data_dir=root / "catalog",
            catalog_service=CatalogSettings(listen="127.0.0.1:0"),
            tls=pki.settings("catalog"),
        )
    )
    catalog_address = f"localhost:{catalog.server.port}"
    channel = open_channel(catalog_address, tls=pki.files("alice"))  # an operator registers
    try:
        await register_local_file(
            catalog_pb2_grpc.CatalogServiceStub(channel), DEFAULT_MODEL_ID, model_path, "node-a"
        )
    finally:
        await channel.close()
    pm = await start_pool_manager(
        PoolManagerSettings(
            node_id="node-a",  # as its certificate names it
            catalog=catalog_address,
            pools=[PoolSettings(pool_id="cpu-0", model_id=DEFAULT_MODEL_ID, n_threads=1)],
        ),
        dict(os.environ),
        tls=pki.files("node-a"),
    )
    assert await pm.manager.wait_ready(60), pm.manager.pools["cpu-0"].last_error
    keys_path = root / "orchestrator" / "keys.db"
    orch = await start_orchestrator(
        OrchestratorSettings(
            catalog=catalog_address,
            pool_managers=[f"localhost:{pm.server.port}"],
            node_heartbeat_s=0.2,
            journal_path=root / "orchestrator" / "journal.db",
            keys_path=keys_path,
            node_listen="127.0.0.1:0",
        ),
        "127.0.0.1:0",
        tls=pki.files("orch"),
    )
    # The operator's own handle on the key file, as `llorch keys` has.
    return SecureMesh(pki, catalog, pm, orch, ApiKeyStore(keys_path))
