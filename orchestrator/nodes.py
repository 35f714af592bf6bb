"""NodeService: pool managers announce themselves to the orchestrator (the node port).

Served on ``orchestrator_service.node_listen``, a service port: with TLS, mTLS, where only role
poolmanager may call RegisterNode (mesh.auth) and only under the node id its certificate names.
"""

from __future__ import annotations

import re

import grpc
from llorch.orchestrator.v1 import nodes_pb2, nodes_pb2_grpc

from mesh import auth
from mesh.errors import InvalidArgumentError
from mesh.ids import check_name
from mesh.server import ServiceBinding
from orchestrator.pools import PoolRegistry

SERVICE_NAME = nodes_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
_ADDRESS_RE = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})")


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    """Registration of pool managers into the orchestrator's pool registry."""

    def __init__(
        self, registry: PoolRegistry, register_again_s: float, any_node_id: bool = False
    ) -> None:
        """``any_node_id``: a pool manager's certificate need not name its node id (fleets
        sharing one certificate; orchestrator_service.node_identity = "any")."""
        self._registry = registry
        self._again_ms = round(register_again_s * 1000)
        self._any_node_id = any_node_id

    def binding(self) -> ServiceBinding:
        return ServiceBinding(
            SERVICE_NAME, lambda s: nodes_pb2_grpc.add_NodeServiceServicer_to_server(self, s)
        )

    async def RegisterNode(
        self, request: nodes_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> nodes_pb2.RegisterNodeResponse:
        node_id = check_name(request.node_id, "node_id")
        match = _ADDRESS_RE.fullmatch(request.address)
        if match is None or not 0 < int(match[2]) < 65536:
            raise InvalidArgumentError("address", "must be host:port, as the pool manager serves")
        auth.require_own_node(
            node_id, "register as the pool manager", any_node_id=self._any_node_id
        )
        await self._registry.register(node_id, request.address)
        return nodes_pb2.RegisterNodeResponse(register_again_ms=self._again_ms)
