"""Who may call what: the role each RPC allows, and the two ways a caller proves its role.

- Service ports (catalog, pool managers) take mTLS: the caller's certificate, verified against
  the CA in the handshake, carries its role (mesh.tls); ``CertAuthorizer`` checks it.
- The orchestrator's client port takes TLS plus an API key in ``authorization: Bearer``;
  ``KeyAuthorizer`` checks the key, its rate limit, and its role.

Every RPC is denied unless ``POLICY`` names it; grpc.health.v1 is open to anyone (probes and load
balancers carry no identity) and reflection to any authenticated caller. A refusal is
UNAUTHENTICATED (no identity, a bad or revoked key, a revoked certificate) or PERMISSION_DENIED
(a role the RPC does not allow), and is logged with the caller's identity or key fingerprint,
never the key.

Revocation reaches calls already running, too: each authorizer's ``recheck`` says whether a
caller still holds; mesh.interceptors asks it for every open stream within about a second of a
revocation (a key revoked with ``llorch keys revoke``, a certificate put on the denylist of
mesh.revocation), and ends the streams of callers that no longer do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from mesh import logs
from mesh.apikeys import ApiKeyStore, RateLimiter
from mesh.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from mesh.revocation import CertId, Denylist, cert_id_of_pem
from mesh.tls import identity_of_auth_context

_log = logs.get_logger("auth")

_PM = "/llorch.poolmanager.v1.PoolManagerService/"
_CAT = "/llorch.catalog.v1.CatalogService/"
_ORCH = "/llorch.orchestrator.v1.OrchestratorService/"
_CTL = "/llorch.orchestrator.v1.ControlService/"

_SERVICES = frozenset({"orchestrator", "poolmanager", "operator"})

POLICY: dict[str, frozenset[str]] = {
    # Pool managers: the orchestrator runs and watches work; operators inspect and maintain.
    # Nobody but the orchestrator executes: that would bypass admission and tenants.
    _PM + "Execute": frozenset({"orchestrator"}),
    _PM + "CancelExecution": frozenset({"orchestrator"}),
    _PM + "GetNode": frozenset({"orchestrator", "operator"}),
    _PM + "WatchNode": frozenset({"orchestrator", "operator"}),
    **{
        _PM + name: frozenset({"orchestrator", "operator"})
        for name in (
            "PreloadPool",
            "DrainPool",
            "ReloadPool",
            "StageModel",
            "UnstageModel",
            "CollectGarbage",
        )
    },
    # Catalog: every service reads; pool managers report what their node holds and uses;
    # operators change models and policy (the orchestrator deletes for ControlService).
    **{
        _CAT + name: _SERVICES
        for name in ("GetModel", "ListModels", "LocateModel", "ListEngines", "GetGcPolicy")
    },
    _CAT + "RegisterModel": frozenset({"poolmanager", "operator"}),
    _CAT + "RegisterEngine": frozenset({"poolmanager", "operator"}),
    _CAT + "MarkModelsUsed": frozenset({"poolmanager"}),
    _CAT + "DeleteReplica": frozenset({"poolmanager", "operator"}),
    _CAT + "SetModelState": frozenset({"operator"}),
    _CAT + "SetModelPinned": frozenset({"operator"}),
    _CAT + "SetGcPolicy": frozenset({"operator"}),
    _CAT + "DeleteModel": frozenset({"orchestrator", "operator"}),
    # The client port: API keys of clients (their own tenant's tasks) and operators.
    **{
        _ORCH + name: frozenset({"client", "operator"})
        for name in (
            "Generate",
            "SubmitTask",
            "SubmitTasks",
            "StreamTask",
            "CancelTask",
            "GetTask",
            "ListTasks",
            "ListModels",
        )
    },
    **{
        _CTL + name: frozenset({"operator"})
        for name in (
            "ListPools",
            "GetPool",
            "DrainPool",
            "ResumePool",
            "ReloadPool",
            "PreloadModel",
            "DeleteModel",
            "GetCapabilities",
            "ListNodes",
        )
    },
    # The orchestrator's node port: pool managers announce themselves.
    "/llorch.orchestrator.v1.NodeService/RegisterNode": frozenset({"poolmanager"}),
}

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_ANY_IDENTITY_PREFIXES = ("/grpc.reflection.",)
_TASK_CREATING = frozenset({_ORCH + "Generate", _ORCH + "SubmitTask", _ORCH + "SubmitTasks"})


@dataclass(frozen=True)
class Caller:
    """Who is calling, once authenticated."""

    role: str
    name: str
    """The certificate's name, or the key's fingerprint."""
    tenant: str = ""
    """The key's tenant (API keys only)."""
    models: frozenset[str] = field(default_factory=frozenset)
    """Model ids the key may use; empty: all."""
    cert: CertId | None = None
    """The certificate the caller presented (certificate callers only)."""
    key_id: str = ""
    """The key's id (API key callers only)."""

    def may_use(self, model_id: str) -> bool:
        return not self.models or model_id in self.models

    @property
    def sees_every_tenant(self) -> bool:
        """Operators see and cancel every tenant's tasks; clients only their own."""
        return self.role == "operator"


caller: ContextVar[Caller | None] = ContextVar("caller", default=None)
"""The authenticated caller of the current RPC; None where the server runs without auth."""


class Authorizer(Protocol):
    """Checks the callers of one server."""

    def __call__(
        self, method: str, context: grpc.aio.ServicerContext, request: Any
    ) -> Caller | None:
        """Checks one call (full method name, context, request or request iterator); returns
        the caller, None for open methods, or raises UnauthenticatedError /
        PermissionDeniedError."""

    def recheck(self, who: Caller) -> UnauthenticatedError | None:
        """Why a caller admitted before no longer holds (its key or certificate revoked since),
        or None while it does. Cheap: it runs for every open stream after each change."""

    def generation(self) -> int:
        """A number that moves when a revocation may have happened (the key file or the
        denylist changed), so open streams need a recheck."""


def _allowed(method: str, role: str, who: str) -> None:
    if method.startswith(_ANY_IDENTITY_PREFIXES):
        return
    roles = POLICY.get(method)
    if roles is None or role not in roles:
        _log.warning("permission denied", extra={"method": method, "peer": who, "role": role})
        raise PermissionDeniedError(
            f"{who} (role {role}) may not call {method.rsplit('/', 1)[-1]}",
            reason="ROLE_NOT_ALLOWED",
        )


def require_own_node(node_id: str, what: str, *, any_node_id: bool = False) -> None:
    """A pool manager acts only for the node its certificate names: registers it, writes its
    records. ``any_node_id``: fleets whose pool managers share one certificate (node_identity
    = "any"). Other roles, and servers without auth, pass.

    Raises:
        PermissionDeniedError: NODE_ID_MISMATCH.
    """
    who = caller.get()
    if who is None or who.role != "poolmanager" or who.name == node_id or any_node_id:
        return
    raise PermissionDeniedError(
        f"certificate poolmanager/{who.name} may not {what} of node {node_id}",
        reason="NODE_ID_MISMATCH",
    )


class CertAuthorizer:
    """mTLS service ports: the role comes from the verified client certificate, which must not
    be on the denylist (mesh.revocation)."""

    def __init__(self, denylist: Denylist | None = None) -> None:
        self._denylist = denylist or Denylist(None)

    def __call__(
        self, method: str, context: grpc.aio.ServicerContext, request: Any
    ) -> Caller | None:
        if method.startswith(_OPEN_PREFIXES):
            return None
        auth_context = context.auth_context() or {}
        identity = identity_of_auth_context(auth_context)
        pem = auth_context.get("x509_pem_cert")
        if identity is None or not pem:
            _log.warning("unauthenticated call", extra={"method": method, "peer": context.peer()})
            raise UnauthenticatedError(
                "this port needs a client certificate with a llama-orch role (llorch certs issue)",
                reason="NO_CLIENT_CERTIFICATE",
            )
        who = Caller(identity.role, identity.name, cert=cert_id_of_pem(pem[0]))
        refusal = self.recheck(who)
        if refusal is not None:
            _log.warning(
                "revoked certificate refused", extra={"method": method, "peer": str(identity)}
            )
            raise refusal
        _allowed(method, identity.role, str(identity))
        return who

    def recheck(self, who: Caller) -> UnauthenticatedError | None:
        if who.cert is None or not self._denylist.revoked(who.cert):
            return None
        return UnauthenticatedError(
            f"certificate {who.role}/{who.name} (serial {who.cert.serial_hex}) is revoked",
            reason="CERTIFICATE_REVOKED",
        )

    def generation(self) -> int:
        return self._denylist.refresh()


class KeyAuthorizer:
    """The orchestrator's client port: ``authorization: Bearer <API key>``."""

    def __init__(self, keys: ApiKeyStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._limiter = RateLimiter()
        self._clock = clock

    def __call__(
        self, method: str, context: grpc.aio.ServicerContext, request: Any
    ) -> Caller | None:
        if method.startswith(_OPEN_PREFIXES):
            return None
        presented = ""
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                presented = value.removeprefix("Bearer ").strip()
                break
        if not presented:
            _log.warning(
                "call without an API key", extra={"method": method, "peer": context.peer()}
            )
            raise UnauthenticatedError(
                "an API key is required: send `authorization: Bearer <key>` (llorch keys create)",
                reason="API_KEY_MISSING",
            )
        key = self._keys.verify(presented)
        if key is None:
            _log.warning("bad API key", extra={"method": method, "peer": context.peer()})
            raise UnauthenticatedError(
                "the API key is unknown, malformed or revoked", reason="API_KEY_INVALID"
            )
        _allowed(method, key.role, key.fingerprint)
        if method in _TASK_CREATING:
            count = len(getattr(request, "requests", ())) or 1
            if key.rate_per_s > 0 and count > self._limiter.burst(key):
                raise InvalidArgumentError(
                    "requests",
                    f"{count} tasks in one call exceed what key {key.fingerprint} may submit "
                    f"at once ({self._limiter.burst(key):g}); send smaller batches",
                )
            wait_s = self._limiter.take(key, count, self._clock())
            if wait_s > 0:
                raise ResourceExhaustedError(
                    f"key {key.fingerprint} is limited to {key.rate_per_s:g} tasks/s",
                    reason="RATE_LIMITED",
                    retry_delay_s=wait_s,
                )
        return Caller(
            key.role, key.fingerprint, key.tenant, frozenset(key.models), key_id=key.key_id
        )

    def recheck(self, who: Caller) -> UnauthenticatedError | None:
        if not who.key_id or not self._keys.is_revoked(who.key_id):
            return None
        return UnauthenticatedError(f"API key {who.name} is revoked", reason="API_KEY_REVOKED")

    def generation(self) -> int:
        return self._keys.generation()
