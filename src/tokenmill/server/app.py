"""The worker's HTTP front: OpenAI's API over an ``AsyncEngine``, plus health, metrics and KV events.

Example::

    from tokenmill.server.app import build_app
    app = build_app(worker)          # a Worker (see server/worker.py)
    uvicorn.run(app, port=8000)

Every response carries ``x-tokenmill-worker``; every error has OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` (see ``server/errors.py``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tokenmill
from tokenmill.engine.errors import EngineError
from tokenmill.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from tokenmill.protocol.completions import CompletionRequest, CompletionResponse
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import WORKER_HEADER
from tokenmill.protocol.openai_common import ErrorResponse
from tokenmill.server.chat import ChatHandler
from tokenmill.server.completions import CompletionsHandler
from tokenmill.server.errors import to_api_error
from tokenmill.server.info_routes import info_router
from tokenmill.server.streams import ClientDisconnected
from tokenmill.server.validation import validation_error
from tokenmill.server.worker import Worker

logger = logging.getLogger(__name__)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "A parameter is invalid; `param` names it."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    429: {"model": ErrorResponse, "description": "The waiting queue is full; see Retry-After."},
    503: {"model": ErrorResponse, "description": "The worker is draining or its engine stopped."},
}
_SSE = {"text/event-stream": {"schema": {"type": "string"}, "example": "data: {...}\n\ndata: [DONE]\n\n"}}


def build_app(worker: Worker) -> FastAPI:
    app = FastAPI(
        title="tokenmill worker",
        version=tokenmill.__version__,
        description="OpenAI-compatible completions and chat over one tokenmill engine.",
    )
    app.state.worker = worker
    completions = CompletionsHandler(worker)
    chat = ChatHandler(worker)
    auth = Depends(_api_key_check(worker))

    @app.post(
        "/v1/completions",
        dependencies=[auth],
        responses={200: {"model": CompletionResponse, "content": _SSE}, **_ERRORS},
        response_model=None,
    )
    async def create_completion(req: CompletionRequest, request: Request) -> Response:
        """Complete one prompt or a batch; `stream: true` sends SSE chunks and `data: [DONE]`."""
        return await _answer(completions(req, request))

    @app.post(
        "/v1/chat/completions",
        dependencies=[auth],
        responses={200: {"model": ChatCompletionResponse, "content": _SSE}, **_ERRORS},
        response_model=None,
    )
    async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation; the first SSE chunk carries the role and the first token."""
        return await _answer(chat(req, request))

    app.include_router(info_router(worker, auth))
    _install_error_handlers(app, _api_key_check(worker))
    app.add_middleware(_InternalErrors)
    app.add_middleware(_WorkerHeader, worker=worker)  # (added last: outermost, so 500s carry it too)
    return app


async def _answer(work: Awaitable[Response]) -> Response:
    """The handler's response, or its error as an OpenAI error body (inside the middleware that
    stamps x-tokenmill-worker, which an unhandled exception would bypass)."""
    try:
        return await work
    except (APIError, EngineError) as e:
        return _error_response(to_api_error(e))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; 499 is what proxies log for this
    except Exception as e:
        return _error_response(to_api_error(e))


def _api_key_check(worker: Worker) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if worker.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), worker.api_key):
            raise APIError.authentication("missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status, headers=error.headers())


def _install_error_handlers(app: FastAPI, key_check: Callable[[Request], Awaitable[None]]) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> Response:
        return _error_response(to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI reads the body before the key check runs: without a valid key, say that first
        # (every POST route needs the key), not what is wrong with a body nobody may send.
        if request.method == "POST":
            try:
                await key_check(request)
            except APIError as e:
                return _error_response(e)
        return _error_response(validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        if exc.status_code == 405 and allow:  # say which methods, as the router does
            message = f"{request.url.path} takes {' or '.join(allow.split(', '))}, not {request.method}"
        response = _error_response(APIError(exc.status_code, message, kind, None, None))
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110 requires it)
        return response


class _InternalErrors:
    """Answers an exception no handler took with OpenAI's 500 body, and keeps the connection open.

    (Not ``app.exception_handler(Exception)``: Starlette runs that inside its ServerErrorMiddleware,
    which re-raises after sending the answer; uvicorn then closes the connection, and a client's
    next request on it fails.)
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            error = to_api_error(exc)  # (logs the traceback)
            if not started:  # else the status line is gone: uvicorn ends the half-sent response
                await _error_response(error)(scope, receive, send)


class _WorkerHeader:
    """Adds x-tokenmill-worker to every response (pure ASGI: no cost on streamed bodies)."""

    def __init__(self, app: ASGIApp, worker: Worker):
        self.app = app
        self.worker = worker  # read per response: with --port 0 the id is known only once bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = (WORKER_HEADER.encode(), self.worker.worker_id.encode())
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_header)
