"""Starts the catalog service: SQLite store + CatalogService on the mesh bootstrap."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.servicer import CatalogServicer
from catalog.store import CatalogStore
from mesh.server import CATALOG_MESSAGE_BYTES, MeshServer, create_server, service_security
from mesh.settings import Settings


@dataclass
class CatalogApp:
    """A running catalog."""

    server: MeshServer
    store: CatalogStore

    @property
    def address(self) -> str:
        """Loopback address of the server."""
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Stops serving and closes the database."""
        await self.server.stop(grace_s=1.0)
        self.store.close()


async def start_catalog(settings: Settings) -> CatalogApp:
    """Opens the store and starts serving."""
    db_path = settings.catalog_service.db_path or settings.data_dir / "catalog.db"
    store = CatalogStore(db_path)
    servicer = CatalogServicer(store, any_node_id=settings.catalog_service.node_identity == "any")
    credentials, authorize = service_security(settings.tls.files())
    server = await create_server(
        settings.catalog_service.listen,
        [servicer.binding()],
        credentials=credentials,
        authorize=authorize,
        max_message_bytes=CATALOG_MESSAGE_BYTES,
    )
    return CatalogApp(server, store)
