"""Routes around generation: models, tokenize/detokenize, health, readiness, version, metrics, KV events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

import tokenmill
from tokenmill.engine.block_hash import HASH_SCHEME, ROOT_PARENT_HASH
from tokenmill.engine.errors import PromptTooLongError
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.openai_common import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    VersionResponse,
)
from tokenmill.protocol.tokenize import TokenizeRequest, TokenizeResponse
from tokenmill.server.chat_prompt import chat_prompt
from tokenmill.server.errors import to_api_error
from tokenmill.server.openai_shared import sse
from tokenmill.server.prompt_tokens import encode
from tokenmill.server.sampling import refuse_unsupported
from tokenmill.server.streams import SSEResponse
from tokenmill.server.worker import Worker


def info_router(worker: Worker, auth: Depends) -> APIRouter:
    router = APIRouter()
    tokenizer = worker.engine.engine.tokenizer

    def check_model(model: str | None) -> None:
        if model not in (None, "", worker.model_name):
            raise APIError.model_not_found(model, [worker.model_name])

    def model_card() -> ModelCard:
        path = worker.engine.engine.model_config.path
        return ModelCard(
            id=worker.model_name,
            created=int(worker.started_at),
            root=str(path) if path else None,
            max_model_len=worker.max_model_len,
        )

    @router.get("/v1/models", dependencies=[auth])
    async def list_models() -> ModelList:
        """The model this worker serves."""
        return ModelList(data=[model_card()])

    @router.get("/v1/models/{model:path}", dependencies=[auth], responses={404: {"model": ErrorResponse}})
    async def retrieve_model(model: str) -> ModelCard:
        """The model, as in the list (the OpenAI SDK's models.retrieve); 404 model_not_found otherwise."""
        if model != worker.model_name:
            raise APIError.model_not_found(model, [worker.model_name])
        return model_card()

    @router.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of messages rendered with the chat template as chat does."""
        check_model(req.model)
        if req.messages is not None:
            if req.prompt is not None:
                raise APIError.invalid_request("send prompt or messages, not both", "messages")
            refuse_unsupported(req)
            tokens = await chat_prompt(
                tokenizer,
                req.messages,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
            )
        elif req.prompt is None:
            raise APIError.invalid_request("one of prompt or messages is required", "prompt")
        else:
            try:
                tokens = await encode(tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)
            except PromptTooLongError as e:
                raise to_api_error(e) from None
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=worker.max_model_len)

    @router.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        check_model(req.model)
        vocab = worker.engine.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError.invalid_request(
                f"tokens contains {bad[0]}: allowed token ids in [0, {vocab})", "tokens"
            )
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False))

    @router.get("/health")
    async def health() -> Response:
        """200 while the engine loop is alive (liveness); 503 once it stopped."""
        if not worker.engine.is_running:
            return JSONResponse({"status": "dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/ready")
    async def ready() -> Response:
        """200 when the model is loaded and new requests are accepted; 503 while draining."""
        stats = worker.engine.stats()
        body: dict[str, Any] = {
            "status": "ready" if worker.ready else ("draining" if worker.draining else "dead"),
            "model": worker.model_name,
            "worker_id": worker.worker_id,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "max_num_seqs": stats.max_num_seqs,
            "kv_cache_usage": stats.kv_cache_usage,
        }
        return JSONResponse(body, status_code=200 if worker.ready else 503)

    @router.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=tokenmill.__version__)

    @router.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/kv_events", dependencies=[auth])
    async def kv_events(request: Request) -> Response:
        """Server-sent KV events for KV-aware routing.

        The first event announces the block size and hash scheme; then one
        event per engine step that stored or removed prefix blocks.
        """
        if not worker.engine.engine.config.kv_events:
            raise APIError.not_found("KV events are off on this worker: start it with --kv-events")
        events = worker.engine.kv_events()
        hello = {
            "type": "config",
            "worker_id": worker.worker_id,
            "model": worker.model_name,
            "block_size": worker.engine.engine.config.block_size,
            "hash_scheme": HASH_SCHEME,
            "root_parent_hash": ROOT_PARENT_HASH,
            "timestamp": time.time(),
        }

        async def stream() -> AsyncIterator[str]:
            yield sse(hello)
            async for batch in events:
                yield sse({"type": "events", **batch.to_dict()})

        return SSEResponse(stream())

    return router
