"""One error hierarchy for every service, and its mapping to gRPC statuses with google.rpc details.

Domain code raises a :class:`LlorchError` subclass; the server interceptor turns it into a status
carrying ``ErrorInfo`` (reason, retriable), ``RetryInfo`` (when retrying may succeed) and
``BadRequest`` (the offending field). A client side error (``grpc.aio.AioRpcError``) turns back
into the same class with :func:`from_rpc_error`, so a pool manager's error can be relayed unchanged.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "llama-orch"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LlorchError(Exception):
    """Base of every error that crosses a service boundary.

    Attributes:
        code: gRPC status code sent to the caller.
        retriable: whether sending the same request again may succeed.
        reason: machine-readable reason (google.rpc.ErrorInfo.reason), UPPER_SNAKE_CASE.
        message: human-readable message.
        retry_delay_s: suggested wait before retrying, when retriable.
        field_violations: (field, description) pairs for google.rpc.BadRequest.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retriable: bool = False
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_delay_s: float | None = None,
        field_violations: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.retry_delay_s = retry_delay_s
        self.field_violations = field_violations or []

    def to_rpc_status(self) -> status_pb2.Status:
        """The google.rpc.Status sent on the wire."""
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason,
            domain=ERROR_DOMAIN,
            metadata={"retriable": "true" if self.retriable else "false"},
        )
        details.append(_pack(info))
        if self.retriable:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(round((self.retry_delay_s or 0.0) * 1000))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
            details.append(_pack(bad))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def to_grpc_status(self) -> grpc.Status:
        """The status for ``context.abort_with_status``."""
        return rpc_status.to_status(self.to_rpc_status())


class InvalidArgumentError(LlorchError):
    """A request field is missing or out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str, *, reason: str | None = None) -> None:
        super().__init__(
            f"{field}: {description}", reason=reason, field_violations=[(field, description)]
        )
        self.field = field


class NotFoundError(LlorchError):
    """An id names nothing that exists."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExistsError(LlorchError):
    """Something with that id exists and differs from what was asked."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPreconditionError(LlorchError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(LlorchError):
    """A bounded resource (the queue) is full; retry after the suggested delay."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retriable = True
    default_reason = "RESOURCE_EXHAUSTED"


class UnavailableError(LlorchError):
    """A pool or service cannot serve now; the same request may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE
    retriable = True
    default_reason = "UNAVAILABLE"


class DeadlineExceededError(LlorchError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class CancelledError(LlorchError):
    """The work was cancelled by its owner."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class UnauthenticatedError(LlorchError):
    """The caller did not prove who it is (no certificate, no key, a bad or revoked key)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(LlorchError):
    """The caller is known but may not do this (its role, its tenant, its model list)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class InternalError(LlorchError):
    """A bug. The wire gets a short message, never a traceback."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[LlorchError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}


def from_rpc_error(err: grpc.aio.AioRpcError) -> LlorchError:
    """Rebuilds the error a peer sent, keeping reason, retry delay and field violations."""
    code = err.code()
    message = err.details() or code.name
    reason: str | None = None
    retry_delay_s: float | None = None
    violations: list[tuple[str, str]] = []
    retriable: bool | None = None
    for key, value in err.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or None
                retriable = info.metadata.get("retriable") == "true"
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay_s = retry.retry_delay.ToMilliseconds() / 1000
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, description = violations[0] if violations else ("request", message)
        error: LlorchError = InvalidArgumentError(field, description, reason=reason)
        error.message = message
        error.field_violations = violations or error.field_violations
        return error
    cls = _BY_CODE.get(code)
    if cls is None:
        # UNKNOWN, UNAUTHENTICATED, ...: keep the code by building an ad-hoc subclass instance.
        error = LlorchError(message, reason=reason or code.name, retry_delay_s=retry_delay_s)
        error.code = code
    else:
        error = cls(message, reason=reason, retry_delay_s=retry_delay_s)
    if retriable is not None:
        error.retriable = retriable
    return error


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_to_dict(error: LlorchError) -> dict[str, Any]:
    """An error as JSON-ready data (for storage), the inverse of :func:`error_from_dict`."""
    return {
        "code": error.code.name,
        "message": error.message,
        "reason": error.reason,
        "retriable": error.retriable,
        "retry_delay_s": error.retry_delay_s,
        "field_violations": [list(v) for v in error.field_violations],
    }


def error_from_dict(data: dict[str, Any]) -> LlorchError:
    """Rebuilds an error stored with :func:`error_to_dict`."""
    code = grpc.StatusCode[data["code"]]
    violations = [(str(f), str(d)) for f, d in data.get("field_violations") or []]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, description = violations[0] if violations else ("request", data["message"])
        error: LlorchError = InvalidArgumentError(field, description, reason=data.get("reason"))
        error.field_violations = violations or error.field_violations
    else:
        cls = _BY_CODE.get(code)
        error = (cls or LlorchError)(
            data["message"], reason=data.get("reason"), retry_delay_s=data.get("retry_delay_s")
        )
        if cls is None:
            error.code = code
    error.message = data["message"]
    error.retriable = bool(data.get("retriable"))
    return error
