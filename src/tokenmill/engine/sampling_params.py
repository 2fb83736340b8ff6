"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tokenmill.engine.errors import InvalidRequestError

_GREEDY_EPS = 1e-5
# The HTTP front's bounds (protocol/openai_common.py), applied here too so that gRPC and the
# LLM API refuse what HTTP refuses: every front gets the same 400 naming the field.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
# Seeds are int64, as in vLLM and on the gRPC wire: the sampler maps int64 one to one onto its
# generator seeds, so a wider seed could only alias another (2**64 would draw as 0 does).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class OutputKind(enum.Enum):
    """What each RequestOutput carries while a request runs."""

    CUMULATIVE = "cumulative"  # everything generated so far, every step
    DELTA = "delta"  # only what is new since the last output
    FINAL_ONLY = "final"  # one output, when the request finishes


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults give greedy decoding of up to 16 tokens.

    Example::

        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, stop=["\\n\\n"], seed=7)
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per token, beside the sampled one
    skip_special_tokens: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop", "a string or a list of non-empty strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.output_kind, OutputKind):
            try:
                self.output_kind = OutputKind(self.output_kind)
            except ValueError:
                allowed = ", ".join(k.value for k in OutputKind)
                raise InvalidRequestError("output_kind", self.output_kind, allowed) from None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self, vocab_size: int | None = None, max_logprobs: int = 20) -> None:
        """Raise InvalidRequestError naming the first out-of-range field."""
        _check(self.n, "n", _int(self.n) and 1 <= self.n <= 128, "an integer in [1, 128]")
        _check(
            self.temperature,
            "temperature",
            _num(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
            f"a number >= 0 and <= {MAX_TEMPERATURE:g} (0 means greedy)",
        )
        _check(self.top_p, "top_p", _num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
        _check(
            self.top_k,
            "top_k",
            _int(self.top_k) and self.top_k >= -1,
            "an integer >= -1 (0 or -1 disables top-k)",
        )
        _check(self.min_p, "min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]")
        _check(
            self.seed,
            "seed",
            self.seed is None or (_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            f"an integer in [{SEED_MIN}, {SEED_MAX}] (int64) or null",
        )
        _check(
            self.repetition_penalty,
            "repetition_penalty",
            _num(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"a number in (0, {MAX_REPETITION_PENALTY:g}] (1 means none)",
        )
        _check(
            self.presence_penalty,
            "presence_penalty",
            _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "a number in [-2, 2]",
        )
        _check(
            self.frequency_penalty,
            "frequency_penalty",
            _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "a number in [-2, 2]",
        )
        _check(
            self.max_tokens,
            "max_tokens",
            self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1),
            "an integer >= 1, or null for up to max_model_len",
        )
        _check(
            self.min_tokens,
            "min_tokens",
            _int(self.min_tokens)
            and self.min_tokens >= 0
            and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
            "an integer in [0, max_tokens]",
        )
        _check(
            self.stop, "stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"
        )
        top = vocab_size if vocab_size is not None else None
        for tid in self.stop_token_ids:
            ok = _int(tid) and tid >= 0 and (top is None or tid < top)
            _check(tid, "stop_token_ids", ok, f"token ids in [0, {top})" if top else "non-negative token ids")
        _check(
            self.logprobs,
            "logprobs",
            self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= max_logprobs),
            f"an integer in [0, {max_logprobs}] or null",
        )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(getattr(self, name), name, isinstance(getattr(self, name), bool), "true or false")


def _num(x: object) -> bool:
    # Finite only, whatever the field's range: inf passes a one-sided bound (temperature=inf
    # samples uniformly). An int is finite however large (math.isfinite would overflow on it).
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    return isinstance(x, int) or math.isfinite(x)


def _int(x: object) -> bool:
    # A bool is an int to Python, but True as a count is a mistake: logprobs=True reached torch's
    # topk, which refuses a bool, and stopped the engine loop for every request.
    return isinstance(x, int) and not isinstance(x, bool)


def _as_list(value: object, name: str, allowed: str) -> list:
    # list(5) would raise a bare TypeError, and list("abc") would split a string into characters.
    if value is None:
        return []
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping):
        return list(value)
    raise InvalidRequestError(name, value, allowed)


def _check(value: object, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise InvalidRequestError(name, value, allowed)
