"""What one routed request carries through the router, and what it owes its worker until it ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from tokenmill.router.kv_index import KVIndex
from tokenmill.router.usage_meter import Usage, UsageMeter
from tokenmill.router.workers import Worker

if TYPE_CHECKING:
    from tokenmill.router.gateway import Admitted
    from tokenmill.router.prompt_blocks import PromptBlocks

_DEFAULT_OUTPUT_TOKENS = 256  # for the load estimate when a request names no max_tokens
_CHARS_PER_TOKEN = 4  # the load estimate's tokenizer (the kv policy counts exactly)
_TEMPLATE_TOKENS = 6  # what a chat template adds per message, about (Llama 3: 5, ChatML: 5)
# Output tokens a request is counted for at most, all its sequences together: what a worker takes
# as max_tokens (gRPC int32), far past any context. A bigger ask (max_tokens 10**23) is refused by
# the gateway as over a limit, or by the worker; load accounting never takes it whole.
MAX_OUTPUT_TOKENS = 2**31 - 1


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
    output_tokens: int  # asked (every sequence's), or the default estimate
    outcome: Outcome


class Outcome:
    """How a request through the gateway ended, for its usage row."""

    __slots__ = ("_worker", "admitted", "meter", "state", "status")

    def __init__(self, admitted: Admitted | None) -> None:
        self.admitted = admitted
        self.status: int | None = None
        # ok, error (the worker's 4xx/5xx), cut, cancelled, unavailable, ledger_error
        self.state = "unavailable"
        self._worker: str | None = None
        self.meter: UsageMeter | None = None

    @property
    def worker(self) -> str | None:
        """The worker that has the request (the last one tried)."""
        return self._worker

    @worker.setter
    def worker(self, name: str | None) -> None:
        self._worker = name
        if self.admitted is not None:  # its usage row names it while it runs (UsageRow.worker)
            self.admitted.row.worker = name

    def meter_for(self, sse: bool) -> UsageMeter | None:
        if self.admitted is None:
            return None
        self.meter = UsageMeter(sse, self.admitted.client_wants_usage)
        return self.meter

    def usage(self) -> Usage:
        return self.meter.usage if self.meter is not None else Usage()

    def chunks(self) -> int | None:
        """Content chunks the client was sent; None for a whole answer (counted by its usage)."""
        if self.meter is None:
            return 0
        return self.meter.events if self.meter.sse else None

    def completion_so_far(self) -> int:
        """Completion tokens sent to the client so far: the worker's count when its chunks carry
        usage, else its content chunks (a token each, as workers stream them)."""
        m = self.meter
        if m is None:
            return 0
        return m.usage.completion_tokens if m.usage.seen else m.events


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


_CHAT_ONLY = ("messages", "max_completion_tokens")


def as_read_at(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """``request`` as the worker's endpoint reads it, for the estimates and the gateway's limits.
    ``/v1/completions`` reads ``prompt`` and ``max_tokens``: chat's ``messages`` and
    ``max_completion_tokens`` mean nothing there (OpenAI refuses them; vLLM and tokenmill ignore
    them), so counting them let ``max_completion_tokens: 1`` reserve one token a sequence while the
    worker generated ``max_tokens``. The body forwarded keeps them, as it keeps any field."""
    if path == "/v1/completions" and ("max_completion_tokens" in request or "messages" in request):
        return {k: v for k, v in request.items() if k not in _CHAT_ONLY}
    return request


def estimate_tokens(request: dict[str, Any], text: str) -> tuple[int, int]:
    """Prompt and output tokens, for load accounting and the gateway's reservations.

    The prompt: ``_text_tokens`` (ASCII at four characters a token, non-ASCII at a token a byte),
    and for chat what a template adds (role and special tokens: ``_TEMPLATE_TOKENS`` a message, and
    the assistant's header), erring high so that a reservation covers the prompt the worker will
    count; token ids are counted. A batch of prompts is all of them. The output: every sequence's, as
    ``asked_output``, or ``_DEFAULT_OUTPUT_TOKENS`` a sequence when the request names no max_tokens.
    """
    count = sequences(request)
    output = _asked(request, count)
    if output is None:
        output = min(_DEFAULT_OUTPUT_TOKENS * count, MAX_OUTPUT_TOKENS)
    prompt = request.get("prompt")
    messages = request.get("messages")
    if messages is None and isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return len(prompt), output  # token ids
        if isinstance(first, list):  # a batch of token-id prompts: their JSON says little of their length
            return sum(len(p) if isinstance(p, list) else _text_tokens(str(p)) for p in prompt), output
        if isinstance(first, str) and not all(p.isascii() for p in prompt if isinstance(p, str)):
            # a batch of texts, not all ASCII: each itself (``text``, their JSON, spells each non-ASCII
            # character as a six-character \u escape, where _text_tokens counts its UTF-8 bytes)
            return sum(_text_tokens(p if isinstance(p, str) else str(p)) for p in prompt), output
    prompt_tokens = _text_tokens(text)
    if isinstance(messages, list):
        prompt_tokens += _TEMPLATE_TOKENS * (len(messages) + 1)
    return prompt_tokens, output


def asked_output(request: dict[str, Any]) -> int | None:
    """The most output tokens the request asks for, every sequence together (``sequences`` times
    max_tokens, or max_completion_tokens), at most ``MAX_OUTPUT_TOKENS``; None when it names none."""
    return _asked(request, sequences(request))


def output_field(request: dict[str, Any]) -> str:
    """The field that sets the request's max_tokens, as the request names it (for errors)."""
    return "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"


def sequences(request: dict[str, Any]) -> int:
    """Sequences the worker generates for a request: per prompt of a completions batch, ``n``, or
    ``best_of`` when larger (an engine that takes it generates that many and returns ``n``). At
    most ``MAX_OUTPUT_TOKENS``: a count past it is the worker's to refuse."""
    # (Asked two or three times a request through the gateway: the common case, a lone prompt
    # without n or best_of, costs three lookups.)
    n, best_of = request.get("n"), request.get("best_of")
    count = 1 if n is None and best_of is None else max(_count(n), _count(best_of))
    prompt = request.get("prompt")
    if (
        prompt.__class__ is list
        and prompt
        and not isinstance(prompt[0], int)
        and request.get("messages") is None
    ):
        count *= len(prompt)  # strings or token-id lists, one prompt each
    return count if count < MAX_OUTPUT_TOKENS else MAX_OUTPUT_TOKENS


def choices(request: dict[str, Any]) -> int:
    """Sequences per prompt: ``n``, or ``best_of`` when larger."""
    return max(_count(request.get("n")), _count(request.get("best_of")))


def choices_field(request: dict[str, Any]) -> str:
    """The field that sets ``choices``, as an error names it: ``best_of`` when larger, else ``n``."""
    return "best_of" if _count(request.get("best_of")) > _count(request.get("n")) else "n"


def _asked(request: dict[str, Any], count: int) -> int | None:
    asked = request.get("max_completion_tokens")
    if asked is None:
        asked = request.get("max_tokens")
    if asked.__class__ is not int or asked <= 0:  # (not a bool, which is an int subclass)
        return None  # none, or a value the worker refuses
    asked *= count
    return asked if asked < MAX_OUTPUT_TOKENS else MAX_OUTPUT_TOKENS


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _text_tokens(text: str) -> int:
    """Tokens of ``text``, erring high where it costs little: ASCII at ``_CHARS_PER_TOKEN``
    characters a token, and non-ASCII text at a token per UTF-8 byte of its non-ASCII characters
    (a byte-level BPE never makes more tokens than bytes; 300 "€" are 900 bytes and 901 tokens on
    the demo tokenizer, where four characters a token said 75), plus one for the BOS a worker adds.
    For ASCII it is not a bound ("a" * 20 can be 20 tokens): a token a byte would reserve about
    four times what English prose and code use, so a team could send a quarter of its limit; what
    the worker counts settles the reservation when the request ends. Pure ASCII, the common case,
    is counted as before, at no cost (``str.isascii`` reads a flag CPython keeps)."""
    if text.isascii():
        return -(-len(text) // _CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars  # (a lone surrogate: 3)
    return -(-ascii_chars // _CHARS_PER_TOKEN) + non_ascii_bytes + 1
