"""What one routed request carries through the router, and what it owes its worker until it ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from tokenmill.router.kv_index import KVIndex
from tokenmill.router.workers import Worker

if TYPE_CHECKING:
    from tokenmill.router.gateway import Admitted
    from tokenmill.router.prompt_blocks import PromptBlocks
    from tokenmill.router.usage_meter import UsageMeter

_DEFAULT_OUTPUT_TOKENS = 256  # for the load estimate when a request names no max_tokens
_CHARS_PER_TOKEN = 4  # the load estimate's tokenizer (the kv policy counts exactly)
_TEMPLATE_TOKENS = 6  # what a chat template adds per message, about (Llama 3: 5, ChatML: 5)


@dataclass(slots=True)
class Call:
    """One proxied request, as the steps of routing it pass it on."""

    scope: Scope
    receive: Receive
    send: Send
    request: dict[str, Any]  # the body, parsed (and rewritten by the gateway)
    body: bytes  # as it goes to the worker
    headers: dict[str, str]
    session: str | None
    text: str  # the prompt's text (prefix_index.prompt_text)
    prompt_tokens: int  # estimated
    output_tokens: int  # asked, or the default estimate
    outcome: Outcome


class Outcome:
    """How a request through the gateway ended, for its usage row."""

    __slots__ = ("admitted", "meter", "state", "status", "worker")

    def __init__(self, admitted: Admitted | None) -> None:
        self.admitted = admitted
        self.status: int | None = None
        # ok, error (the worker's 4xx/5xx), cut, cancelled, unavailable, ledger_error
        self.state = "unavailable"
        self.worker: str | None = None
        self.meter: UsageMeter | None = None

    def meter_for(self, sse: bool) -> UsageMeter | None:
        if self.admitted is None:
            return None
        from tokenmill.router.usage_meter import UsageMeter

        self.meter = UsageMeter(sse, self.admitted.client_wants_usage)
        return self.meter

    def usage(self) -> Any:
        from tokenmill.router.usage_meter import Usage

        return self.meter.usage if self.meter is not None else Usage()

    def chunks(self) -> int:
        return self.meter.events if self.meter is not None else 0


class Prefill:
    """What a routed request adds to its worker until its first byte: its prefill to the queue
    estimate and, for the kv policy, its blocks as expected there (before the worker's events
    can say so)."""

    __slots__ = ("_blocks", "_kv", "_pending", "_tokens", "_worker")

    def __init__(self, worker: Worker, tokens: int, kv: KVIndex | None, blocks: PromptBlocks | None) -> None:
        self._worker, self._tokens, self._kv, self._blocks = worker, tokens, kv, blocks
        self._pending = True
        worker.pending_prefill += tokens
        if kv is not None and blocks is not None:
            kv.expect(worker.url, blocks.hashes)

    def done(self) -> None:
        if self._pending:
            self._pending = False
            self._worker.pending_prefill -= self._tokens
            if self._kv is not None and self._blocks is not None:
                self._kv.settle(self._worker.url, self._blocks.hashes)


def estimate_tokens(request: dict[str, Any], text: str) -> tuple[int, int]:
    """Prompt and asked output tokens, for load accounting and the gateway's reservations: a
    token per four characters, rounded up, and for chat what a template adds (role and special
    tokens: ``_TEMPLATE_TOKENS`` a message, and the assistant's header), erring high so that a
    reservation covers the prompt the worker will count."""
    prompt = request.get("prompt")
    messages = request.get("messages")
    if messages is None and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt), asked_output(request) or _DEFAULT_OUTPUT_TOKENS  # token ids
    prompt_tokens = -(-len(text) // _CHARS_PER_TOKEN)
    if isinstance(messages, list):
        prompt_tokens += _TEMPLATE_TOKENS * (len(messages) + 1)
    return prompt_tokens, asked_output(request) or _DEFAULT_OUTPUT_TOKENS


def asked_output(request: dict[str, Any]) -> int | None:
    asked = request.get("max_completion_tokens", request.get("max_tokens"))
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else None
