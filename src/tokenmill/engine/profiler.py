"""Measure a real model's step times and fit a ``TimingModel`` (``tokenmill profile``).

The engine runs a fixed set of workloads that cover the shapes a server sees:
prefills of growing length, decode batches of growing size and context, and
decodes sharing steps with prefill chunks. Every step's shape and duration is
recorded and the linear timing model is fitted to all of them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.timing import StepShape, TimingModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileWorkload:
    name: str
    num_requests: int
    prompt_len: int
    max_tokens: int
    max_num_batched_tokens: int | None = None
    late_prompt_len: int = 0  # a prompt that arrives once the others decode (mixed steps)


def default_workloads(max_model_len: int, quick: bool = False) -> list[ProfileWorkload]:
    def fit(n: int) -> int:
        return max(4, min(n, max_model_len // 2))

    prefill = [fit(n) for n in ((16, 128, 512) if quick else (16, 64, 256, 512, 1024))]
    batches = (1, 8) if quick else (1, 4, 16, 48)
    contexts = (32,) if quick else (64, 512)
    steps = 4 if quick else 16
    loads = [ProfileWorkload(f"prefill-{n}", 1, n, 1) for n in prefill]
    loads += [ProfileWorkload(f"decode-{b}x{fit(c)}", b, fit(c), steps) for b in batches for c in contexts]
    for b in (4,) if quick else (4, 16):
        for chunk in (32,) if quick else (64, 256):
            loads.append(ProfileWorkload(f"mixed-{b}+{chunk}", b, fit(64), steps, chunk + b, fit(chunk * 4)))
    return loads


class _Recorder:
    def __init__(self) -> None:
        self.shapes: list[StepShape] = []
        self.seconds: list[float] = []

    def record(self, shape: StepShape, seconds: float) -> None:
        self.shapes.append(shape)
        self.seconds.append(seconds)


def profile_engine(
    config: EngineConfig,
    quick: bool = False,
    repeats: int = 2,
    progress: Callable[[str], None] | None = None,
) -> TimingModel:
    """Run the workloads ``repeats`` times on a fresh engine and fit the timing model.

    Prefix caching is turned off so every prompt token is really computed.
    """
    config = replace(config, enable_prefix_caching=False, max_itl=None, runner="model")
    engine = Engine(config)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    workloads = default_workloads(engine.max_model_len, quick)
    recorder = _Recorder()
    warmup = ProfileWorkload("warm-up", 2, min(32, engine.max_model_len // 2), 4)
    _run(engine, warmup, rng, vocab, None)  # first steps pay for lazy initialisation
    for r in range(repeats):
        for w in workloads:
            if progress:
                progress(f"{w.name} ({r + 1}/{repeats})")
            _run(engine, w, rng, vocab, recorder)
    model = TimingModel.fitted(
        recorder.shapes,
        recorder.seconds,
        model=str(config.model or "demo"),
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        kv_cache_tokens=engine.kv_plan.num_tokens,
    )
    model.fit["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    logger.info("timing model fitted on %d steps: %s", len(recorder.shapes), model.fit)
    return model


def _run(
    engine: Engine, w: ProfileWorkload, rng: random.Random, vocab: int, recorder: _Recorder | None
) -> None:
    budget = w.max_num_batched_tokens or engine.scheduler.config.max_num_batched_tokens
    old_config = engine.scheduler.config
    engine.scheduler.config = replace(old_config, max_num_batched_tokens=budget)
    engine.step_timing = recorder
    params = SamplingParams(max_tokens=w.max_tokens, ignore_eos=True, temperature=0.0)
    try:
        for _ in range(w.num_requests):
            engine.add_request(None, [rng.randrange(vocab) for _ in range(w.prompt_len)], params)
        late_added = w.late_prompt_len == 0
        while engine.has_unfinished_requests():
            engine.step()
            if not late_added and engine.scheduler.num_waiting == 0:
                late = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
                engine.add_request(None, [rng.randrange(vocab) for _ in range(w.late_prompt_len)], late)
                late_added = True
    finally:
        engine.scheduler.config = old_config
        engine.step_timing = None
