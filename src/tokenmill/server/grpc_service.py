"""The gRPC front of a worker: ``tokenmill.v1.Generation`` over the worker's ``AsyncEngine``.

Example::

    server = await start_grpc_server(worker, "0.0.0.0", 50051)
    print("gRPC on port", server.port)
    ...
    await server.stop(grace=5.0)

A Generate call sends one message per engine step, built straight from the
step's DELTA output: no per-token Python work beyond filling the message.
Leaving a call any way but through its last message (the client cancels, the
deadline passes, the server stops) closes the engine stream, which aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from tokenmill.engine.input_processor import Prompt
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.protocol import generation_pb2 as pb
from tokenmill.protocol import generation_pb2_grpc as pb_grpc
from tokenmill.protocol.chat import CHAT_ROLES
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import (
    ERROR_CODE_METADATA,
    ERROR_PARAM_METADATA,
    ERROR_TYPE_METADATA,
    PRIORITY_HEADER,
    REQUEST_ID_HEADER,
    TENANT_HEADER,
    WORKER_HEADER,
    parse_priority,
)
from tokenmill.server.errors import to_api_error
from tokenmill.server.prompt_tokens import encode_chat, tokenized
from tokenmill.server.worker import Worker

logger = logging.getLogger(__name__)

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# proto3 optional fields: absent means the model's default, so only those present override it.
_OPTIONAL_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "skip_special_tokens",
    "logprobs",
)


class GenerationService(pb_grpc.GenerationServicer):
    """The servicer; every RPC sends ``x-tokenmill-worker`` as initial metadata."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._defaults = worker.engine.engine.default_sampling_params()
        self._tokenizer = worker.engine.engine.tokenizer
        self._expected_auth = f"Bearer {worker.api_key}".encode() if worker.api_key is not None else None
        # Ids of the Generate calls running here: Abort reaches only these, not the HTTP front's
        # requests, whose ids share the engine's space (an id from an HTTP stream's chunk would
        # otherwise let a gRPC client cut another client's request).
        self._running: set[str] = set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        metadata = _metadata(context)
        try:
            self._authenticate(metadata)
            self.worker.check_accepting()
            self._check_model(request.model)
            priority = (
                request.priority
                if request.HasField("priority")
                else parse_priority(metadata.get(PRIORITY_HEADER)) or 0
            )
            # open() raises bad input and overload here, before the response starts.
            stream = self.worker.engine.open(
                await self._prompt(request),
                self._sampling_params(request),
                request_id,
                priority,
                request.cache_salt or None,
                truncate_max_tokens=not request.HasField("max_tokens"),  # (as over HTTP)
            )
        except Exception as exc:
            prompt_field = "chat.messages" if request.WhichOneof("prompt") == "chat" else "prompt"
            await _abort(context, to_api_error(exc, prompt_field), self.worker.worker_id)
        logger.debug(
            "grpc generate %s tenant=%s priority=%d", request_id, metadata.get(TENANT_HEADER), priority
        )
        self._running.add(request_id)
        # Honour the deadline here too: a client slow to cancel must not keep its blocks.
        deadline = asyncio.timeout(context.time_remaining())
        reported: set[int] = set()  # choices whose finish was sent (n > 1: others keep running)
        try:
            # Sent once the engine holds the request, so an Abort naming this id cannot overtake it.
            initial = ((WORKER_HEADER, self.worker.worker_id), (REQUEST_ID_HEADER, request_id))
            await context.send_initial_metadata(initial)
            async with deadline:
                async for out in stream:
                    response = _response(out, reported)
                    if response is not None:
                        await context.write(response)
        except Exception as exc:
            if deadline.expired():
                logger.debug("grpc generate %s: deadline passed, aborting", request_id)
                error = APIError(
                    504, "the request's deadline passed; it was aborted", "timeout", None, "timeout"
                )
            else:
                error = to_api_error(exc)
            await _abort(context, error)
        finally:
            self._running.discard(request_id)
            stream.close()  # a no-op after the last output; otherwise it aborts the request

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._start(context)
        try:
            self._authenticate(_metadata(context))
            if not request.request_id:
                raise APIError.invalid_request(
                    "request_id is required: the id of a running request", "request_id"
                )
            running = request.request_id in self._running
            aborted = running and await self.worker.engine.abort(request.request_id)
        except Exception as exc:
            await _abort(context, to_api_error(exc))
        logger.debug("grpc abort %s: %s", request.request_id, "aborted" if aborted else "not running")
        return pb.AbortResponse(aborted=aborted)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        # No key needed, as for HTTP /health: load balancers probe it.
        await self._start(context)
        stats = self.worker.engine.stats()
        status = pb.HealthResponse.SERVING if self.worker.ready else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(
            status=status,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            worker_id=self.worker.worker_id,
        )

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        await self._start(context)
        try:
            self._authenticate(_metadata(context))
        except APIError as exc:
            await _abort(context, exc)
        engine = self.worker.engine.engine
        return pb.ModelInfoResponse(
            model=self.worker.model_name,
            max_model_len=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            architecture=engine.model_config.architecture,
            block_size=engine.config.block_size,
            max_num_seqs=engine.config.max_num_seqs,
            worker_id=self.worker.worker_id,
        )

    # -- checks ------------------------------------------------------------------

    async def _prompt(self, request: pb.GenerateRequest) -> Prompt:
        which = request.WhichOneof("prompt")
        if which == "text":
            return (await tokenized(self._tokenizer, [request.text]))[0]
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "chat":
            if not request.chat.messages:
                raise APIError.invalid_request(
                    "chat.messages must hold at least one message", "chat.messages"
                )
            for i, m in enumerate(request.chat.messages):
                if m.role not in CHAT_ROLES:  # as the HTTP front's schema has it
                    raise APIError.invalid_request(
                        f"chat.messages[{i}].role={m.role!r} is invalid: allowed {', '.join(CHAT_ROLES)}",
                        f"chat.messages[{i}].role",
                    )
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            add = (
                request.chat.add_generation_prompt if request.chat.HasField("add_generation_prompt") else True
            )
            # Rendered here, as the HTTP chat endpoint does, so both fronts build the same prompt.
            return await encode_chat(self._tokenizer, messages, add_generation_prompt=add)
        raise APIError.invalid_request("prompt is required: set text, token_ids or chat", "prompt")

    async def _start(self, context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata(((WORKER_HEADER, self.worker.worker_id),))

    def _authenticate(self, metadata: dict[str, str]) -> None:
        if self._expected_auth is None:
            return
        given = metadata.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):  # constant time: no key guessing by timing
            raise APIError.authentication(
                "missing or invalid API key: send metadata 'authorization: Bearer KEY'"
            )

    def _check_model(self, model: str) -> None:
        if model and model != self.worker.model_name:
            raise APIError.model_not_found(model, [self.worker.model_name])

    def _sampling_params(self, request: pb.GenerateRequest) -> SamplingParams:
        fields = {
            name: getattr(request, name) for name in _OPTIONAL_SAMPLING_FIELDS if request.HasField(name)
        }
        return replace(
            self._defaults,
            **fields,
            stop=list(request.stop),
            stop_token_ids=list(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_str_in_output,
            output_kind=OutputKind.DELTA,
        )


@dataclass
class GrpcServer:
    """A started gRPC server and the port it is bound to (useful when asked for port 0)."""

    server: grpc.aio.Server
    host: str
    port: int

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls; cancel the running ones after ``grace`` seconds (their requests are aborted)."""
        await self.server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_server(worker: Worker, host: str = "127.0.0.1", port: int = 50051) -> GrpcServer:
    """Serve ``tokenmill.v1.Generation`` for ``worker`` on ``host:port`` (0: any free port)."""
    # Without this, Linux lets a second worker bind the same port and silently share its calls.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GenerationServicer_to_server(GenerationService(worker), server)
    bound = server.add_insecure_port(_address(host, port))
    await server.start()
    logger.info("gRPC front of worker %s listening on %s", worker.worker_id, _address(host, bound))
    return GrpcServer(server, host, bound)


# -- requests and responses ----------------------------------------------------------------


def _response(out: RequestOutput, reported: set[int]) -> pb.GenerateResponse | None:
    """The message for one step's output; None when no choice has anything new."""
    # Choices are filled in place (choices.add): building them apart and passing them in copies each.
    response = pb.GenerateResponse(request_id=out.request_id)
    for c in out.outputs:
        if c.finish_reason is None:
            if not c.token_ids and not c.text:
                continue
        elif c.index in reported:  # finished in an earlier step: nothing new since
            continue
        else:
            reported.add(c.index)
        _fill_choice(response.choices.add(index=c.index, token_ids=c.token_ids, text=c.text), c)
    if out.finished:
        m = out.metrics
        usage = response.usage
        usage.prompt_tokens = m.num_prompt_tokens
        usage.completion_tokens = m.num_output_tokens
        usage.cached_tokens = m.num_cached_tokens
    elif not response.choices:
        return None
    return response


def _fill_choice(choice: pb.ChoiceDelta, c: CompletionOutput) -> None:
    if c.logprobs:
        for lp in c.logprobs:
            top = [pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]
            choice.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, top=top)
    if c.finish_reason is not None:
        choice.finish_reason = c.finish_reason
        if isinstance(c.stop_reason, str):
            choice.stop_str = c.stop_reason
        elif isinstance(c.stop_reason, int):
            choice.stop_token_id = c.stop_reason


# -- plumbing --------------------------------------------------------------------------------


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


async def _abort(
    context: grpc.aio.ServicerContext, error: APIError, worker_id: str | None = None
) -> NoReturn:
    """End the call with the gRPC status for ``error``; its fields travel as trailing metadata."""
    if worker_id is not None:  # the call failed before its initial metadata went out
        await context.send_initial_metadata(((WORKER_HEADER, worker_id),))
    trailing = [(ERROR_TYPE_METADATA, error.type)]
    if error.param:
        trailing.append((ERROR_PARAM_METADATA, error.param))
    if error.code:
        trailing.append((ERROR_CODE_METADATA, error.code))
    trailing.extend(error.headers().items())  # retry-after
    code = _STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)
    await context.abort(code, error.message, trailing_metadata=tuple(trailing))
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
