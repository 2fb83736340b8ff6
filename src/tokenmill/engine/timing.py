"""A linear model of how long one engine step takes, fitted from measured steps.

    step_time = overhead
              + per_token        * scheduled tokens (prefill + decode: the matmuls)
              + per_decode       * decoding sequences (sampling, per-sequence work)
              + per_context_token * context tokens the decodes read (attention, KV bandwidth)
              + per_attention_pair * query-key pairs of the prefills (their quadratic attention)

The same model drives the ``SimulatedRunner`` (how long a fake step lasts) and
chunked prefill under ``max_itl`` (how many prompt tokens fit into a step
without stretching the running decodes' inter-token latency past the target).
Profiles are small JSON files written by ``tokenmill profile``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.scheduler_output import SchedulerOutput

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "demo-cpu.json"


@dataclass(frozen=True)
class StepShape:
    """What a step computes, in the terms the timing model charges for."""

    num_prefill_tokens: int = 0
    num_decodes: int = 0
    decode_context_tokens: int = 0
    prefill_attention_pairs: float = 0.0

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        computed = {n.request_id: n.num_computed_tokens for n in sched.new_requests}
        computed.update({c.request_id: c.num_computed_tokens for c in sched.cached_requests})
        shape = cls()
        for rid, n in sched.num_scheduled_tokens.items():
            shape = shape + cls.of_request(n, computed.get(rid, 0))
        return shape

    @classmethod
    def of_request(cls, num_tokens: int, start: int) -> StepShape:
        """One request's share of a step: ``num_tokens`` computed from position ``start``."""
        if num_tokens == 1 and start > 0:
            return cls(0, 1, start + 1, 0.0)
        return cls(num_tokens, 0, 0, num_tokens * (start + (num_tokens + 1) / 2))

    def __add__(self, other: StepShape) -> StepShape:
        return StepShape(
            self.num_prefill_tokens + other.num_prefill_tokens,
            self.num_decodes + other.num_decodes,
            self.decode_context_tokens + other.decode_context_tokens,
            self.prefill_attention_pairs + other.prefill_attention_pairs,
        )

    def __sub__(self, other: StepShape) -> StepShape:
        return StepShape(
            self.num_prefill_tokens - other.num_prefill_tokens,
            self.num_decodes - other.num_decodes,
            self.decode_context_tokens - other.decode_context_tokens,
            self.prefill_attention_pairs - other.prefill_attention_pairs,
        )

    def features(self) -> list[float]:
        return [
            1.0,
            float(self.num_prefill_tokens + self.num_decodes),
            float(self.num_decodes),
            float(self.decode_context_tokens),
            self.prefill_attention_pairs,
        ]


_COEFFS = ("overhead_s", "per_token_s", "per_decode_s", "per_context_token_s", "per_attention_pair_s")


@dataclass(frozen=True)
class TimingModel:
    overhead_s: float = 0.0
    per_token_s: float = 0.0
    per_decode_s: float = 0.0
    per_context_token_s: float = 0.0
    per_attention_pair_s: float = 0.0
    # Where it was measured, and the KV capacity a simulated worker should have.
    model: str = ""
    device: str = ""
    dtype: str = ""
    kv_cache_tokens: int | None = None
    fit: dict[str, Any] = field(default_factory=dict)  # samples, error: how good the fit is

    def step_time(self, shape: StepShape) -> float:
        coeffs = [getattr(self, c) for c in _COEFFS]
        return float(sum(c * x for c, x in zip(coeffs, shape.features(), strict=True)))

    @classmethod
    def fitted(cls, shapes: list[StepShape], seconds: list[float], **meta: Any) -> TimingModel:
        """Least squares with every coefficient kept >= 0 (a negative cost would make no sense
        and would let the chunk sizer extrapolate wildly)."""
        x = np.array([s.features() for s in shapes], dtype=np.float64)
        y = np.array(seconds, dtype=np.float64)
        coef = _nonnegative_lstsq(x, y)
        pred = x @ coef
        rel = np.abs(pred - y) / np.maximum(y, 1e-9)
        fit = {
            "samples": len(y),
            "median_relative_error": float(np.median(rel)) if len(y) else 0.0,
            "p90_relative_error": float(np.quantile(rel, 0.9)) if len(y) else 0.0,
        }
        return cls(**dict(zip(_COEFFS, map(float, coef), strict=True)), fit=fit, **meta)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TimingModel:
        """Parse a profile; raises ValueError if it is not one."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a profile is a JSON object")
        bad = [c for c in _COEFFS if not isinstance(raw.get(c, 0.0), int | float) or raw.get(c, 0.0) < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be numbers >= 0 (seconds)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, path: str | Path | None = None) -> TimingModel:
        """A profile from a file; None loads the default profile that ships with tokenmill.

        Raises InvalidRequestError naming ``timing_profile`` when the file is missing or
        is not a profile.
        """
        file = Path(path or DEFAULT_PROFILE)
        try:
            return cls.from_json(file.read_text())
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise InvalidRequestError(
                "timing_profile", str(path), f"a JSON profile written by `tokenmill profile` ({e})"
            ) from e


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
    return coef


class StepTimeRecorder(Protocol):
    def record(self, shape: StepShape, seconds: float) -> None: ...


class OnlineTimingModel:
    """A timing model refitted from the engine's own recent steps.

    Starts from a prior profile, rescaled to this machine by the median ratio
    of measured to predicted step time, and switches to a fresh fit once it has
    seen enough steps of different shapes.
    """

    def __init__(self, prior: TimingModel, window: int = 512, refit_every: int = 32):
        self.model = prior
        self._prior = prior
        self._scale = 1.0
        self._samples: deque[tuple[StepShape, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self.fitted = False

    def record(self, shape: StepShape, seconds: float) -> None:
        self._samples.append((shape, seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every:
            self._refit()

    def step_time(self, shape: StepShape) -> float:
        return self._scale * self.model.step_time(shape)

    def _refit(self) -> None:
        self._since_fit = 0
        shapes = [s for s, _ in self._samples]
        secs = [t for _, t in self._samples]
        with_prefill = sum(1 for s in shapes if s.num_prefill_tokens > 0)
        with_decode = sum(1 for s in shapes if s.num_decodes > 0)
        if with_prefill >= 8 and with_decode >= 8:
            self.model = TimingModel.fitted(shapes, secs)
            self._scale = 1.0
            self.fitted = True
        elif not self.fitted:
            ratios = [t / p for s, t in self._samples if (p := self._prior.step_time(s)) > 0]
            if ratios:
                self._scale = float(np.median(ratios))


class ChunkSizer:
    """How many prefill tokens a step may still take so that the decodes in it keep ``max_itl``."""

    def __init__(self, timing: TimingModel | OnlineTimingModel, max_itl: float, min_chunk: int):
        self.timing = timing
        self.max_itl = max_itl
        self.min_chunk = min_chunk

    def max_chunk(self, committed: StepShape, context: int, limit: int) -> int:
        """The largest chunk, of a prefill whose first ``context`` tokens are already in the KV
        cache, that keeps the step (``committed`` so far plus this chunk) within ``max_itl``."""
        if committed.num_decodes == 0:
            return limit  # nobody is waiting on a next token: read prompts as fast as possible

        def fits(n: int) -> bool:
            shape = StepShape(
                committed.num_prefill_tokens + n,
                committed.num_decodes,
                committed.decode_context_tokens,
                committed.prefill_attention_pairs + n * (context + (n + 1) / 2),
            )
            return self.timing.step_time(shape) <= self.max_itl

        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        if committed.num_prefill_tokens == 0:
            # Some progress every step, or a long prompt would starve behind a big decode batch.
            lo = max(lo, self.min_chunk)
        return min(limit, lo)
