"""Clients of a tokenmill worker's gRPC API (``tokenmill.v1.Generation``), async and sync.

Example, with a worker serving gRPC on 127.0.0.1:50051::

    import asyncio

    from tokenmill.client import AsyncGenerationClient


    async def main() -> None:
        async with AsyncGenerationClient("127.0.0.1:50051") as client:
            async for chunk in client.generate("ROMEO:", max_tokens=32, temperature=0.0):
                print(chunk.text, end="", flush=True)
            print()
            print(await client.model_info())


    asyncio.run(main())

The same, synchronous::

    from tokenmill.client import GenerationClient

    with GenerationClient("127.0.0.1:50051") as client:
        for chunk in client.generate("ROMEO:", max_tokens=32, temperature=0.0):
            print(chunk.text, end="", flush=True)

The prompt is text, token ids, or chat messages (``[{"role": "user", "content": ...}]``,
rendered with the worker's chat template). Each chunk is one engine step: the
new text and token ids of every sample that has any (``n`` > 1 gives several
choices), and, on the last chunk, the usage.
Sampling fields left out take the model's defaults. Leaving the loop early
cancels the call, and the worker aborts the request.

Errors: every failure raises ``tokenmill.protocol.APIError`` with the status the
HTTP API would answer: 400 (``param`` names the field), 401, 404, 429
(``retry_after`` in seconds), 503 (draining or unreachable), 500 otherwise. A
call past its ``timeout`` raises ``DeadlineExceededError``, which is both an
``APIError`` (status 504) and a ``TimeoutError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Unpack

import grpc

from tokenmill.client.grpc_messages import (
    GenerateOptions,
    GenerationChunk,
    Health,
    ModelInfo,
    Prompt,
    build_request,
    to_chunk,
    to_health,
    to_model_info,
)
from tokenmill.protocol import generation_pb2 as pb
from tokenmill.protocol import generation_pb2_grpc as pb_grpc
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import (
    ERROR_CODE_METADATA,
    ERROR_PARAM_METADATA,
    ERROR_TYPE_METADATA,
    TENANT_HEADER,
)

DEFAULT_TARGET = "127.0.0.1:50051"

Metadata = Sequence[tuple[str, str]]


class DeadlineExceededError(APIError, TimeoutError):
    """The call's timeout passed; the worker aborted the request. Status 504."""


class AsyncGenerationClient:
    """asyncio client; the channel opens on first use, so it may be built outside a running loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.target = target
        self.timeout = timeout  # seconds per call; None: no deadline
        self._credentials = credentials
        self._metadata = _auth_metadata(api_key)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None

    async def generate(
        self,
        prompt: Prompt,
        *,
        priority: int | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the request's chunks; ``timeout`` overrides the client's for this call."""
        request = build_request(prompt, request_id, priority, options)
        call = self._get_stub().Generate(
            request, timeout=self._timeout(timeout), metadata=self._call_metadata(tenant, metadata)
        )
        try:
            async for message in call:
                yield to_chunk(message)
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc
        finally:
            call.cancel()  # no-op once the stream ended; otherwise the worker aborts the request

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running request; False if the worker had no such request running."""
        try:
            response = await self._get_stub().Abort(
                pb.AbortRequest(request_id=request_id),
                timeout=self._timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc
        return response.aborted

    async def health(self, *, timeout: float | None = None) -> Health:
        try:
            response = await self._get_stub().Health(
                pb.HealthRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc
        return to_health(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            response = await self._get_stub().ModelInfo(
                pb.ModelInfoRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc
        return to_model_info(response)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_stub(self) -> pb_grpc.GenerationStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials)
            self._stub = pb_grpc.GenerationStub(self._channel)
        return self._stub

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _call_metadata(self, tenant: str | None, extra: Metadata | None) -> Metadata:
        return _with_tenant(self._metadata, tenant, extra)


class GenerationClient:
    """Blocking client over grpc's sync channel; the same calls as ``AsyncGenerationClient``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        priority: int | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[GenerationChunk]:
        """Iterate over the request's chunks; ``timeout`` overrides the client's for this call."""
        request = build_request(prompt, request_id, priority, options)
        call = self._stub.Generate(
            request, timeout=self._timeout(timeout), metadata=_with_tenant(self._metadata, tenant, metadata)
        )
        try:
            for message in call:
                yield to_chunk(message)
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc
        finally:
            call.cancel()

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running request; False if the worker had no such request running."""
        request = pb.AbortRequest(request_id=request_id)
        return self._unary(self._stub.Abort, request, timeout).aborted

    def health(self, *, timeout: float | None = None) -> Health:
        return to_health(self._unary(self._stub.Health, pb.HealthRequest(), timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return to_model_info(self._unary(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise to_api_error(exc) from exc

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


# -- errors and metadata ----------------------------------------------------------------------

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# For errors that did not come from a tokenmill server (a proxy, the transport itself).
_DEFAULT_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def to_api_error(exc: grpc.RpcError) -> APIError:
    """The APIError for a failed call, rebuilt from its status and trailing metadata."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    status = _HTTP_STATUS.get(code, 500)
    trailing = _pairs(exc.trailing_metadata())  # type: ignore[attr-defined]
    retry_after = trailing.get("retry-after")
    cls = DeadlineExceededError if code == grpc.StatusCode.DEADLINE_EXCEEDED else APIError
    return cls(
        status,
        exc.details() or f"gRPC call failed: {code.name}",  # type: ignore[attr-defined]
        trailing.get(ERROR_TYPE_METADATA) or _DEFAULT_TYPE.get(status, "api_error"),
        trailing.get(ERROR_PARAM_METADATA),
        trailing.get(ERROR_CODE_METADATA),
        float(retry_after) if retry_after and _is_number(retry_after) else None,
    )


def _pairs(metadata: Iterable[Any] | None) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _auth_metadata(api_key: str | None) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _with_tenant(base: Metadata, tenant: str | None, extra: Metadata | None) -> Metadata:
    md = list(base)
    if tenant:
        md.append((TENANT_HEADER, tenant))
    if extra:
        md.extend(extra)
    return md
