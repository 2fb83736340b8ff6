"""Turning a step's logits into tokens, per request parameters.

Order of operations, as in vLLM: repetition / presence / frequency penalties,
the min_tokens mask on end tokens, temperature, top-k, top-p, min-p, then
sampling. Logprobs are those of the raw model distribution, before any of it.

A seeded request draws its randomness from a generator seeded by (seed, index
of the token being sampled), so it reproduces exactly whatever batch it lands
in and however often it is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import TokenLogprob
from tokenmill.engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003


@dataclass
class SamplingRow:
    """One request that samples this step. Holds the runner's token list itself:
    slicing it into prompt and output costs O(tokens) per step, so only the
    penalties that need the pieces do it."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._row_generator = torch.Generator(device=device)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float()
        raw = logits
        if any(_has_penalty(r.params) for r in rows):
            logits = self._apply_penalties(logits.clone(), rows)
        logits = self._mask_early_stop(logits, rows)
        greedy = [r.params.greedy for r in rows]
        tokens = _argmax(logits) if all(greedy) else self._sample(logits, rows, greedy)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, rows, token_list)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.token_ids)), device=self.device)
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                # transformers' rule: shrink positive logits, push negative ones further down.
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                counts = torch.bincount(
                    torch.tensor(r.output_token_ids, device=self.device), minlength=vocab
                )[:vocab]
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _mask_early_stop(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        cloned = False
        for i, r in enumerate(rows):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops |= r.eos_token_ids
                if stops:
                    if not cloned:
                        logits, cloned = logits.clone(), True
                    ids = [t for t in stops if t < logits.shape[1]]
                    logits[i, ids] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        greedy_tokens = _argmax(logits)
        temps = torch.tensor(
            [1.0 if g else r.params.temperature for r, g in zip(rows, greedy, strict=True)],
            device=self.device,
        )
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        probs = self._top_k_top_p(probs, rows)
        min_p = [r.params.min_p for r in rows]
        if any(min_p):
            mp = torch.tensor(min_p, device=self.device).unsqueeze(1)
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race: argmax(p / q), q ~ Exp(1), draws from p without a normalised CDF.
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.params.seed is not None and not greedy[i]:
                self._row_generator.manual_seed(row_seed(r.params.seed, r.num_output_tokens))
                q[i].exponential_(generator=self._row_generator)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(torch.tensor(greedy, device=self.device), greedy_tokens, sampled)

    def _top_k_top_p(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if not any(top_k) and all(p >= 1.0 for p in top_p):
            return probs
        vocab = probs.shape[1]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if any(top_k):
            k = torch.tensor([t if t > 0 else vocab for t in top_k], device=self.device)
            keep &= torch.arange(vocab, device=self.device).unsqueeze(0) < k.unsqueeze(1)
        if any(p < 1.0 for p in top_p):
            p = torch.tensor(top_p, device=self.device).unsqueeze(1)
            # Keep a token if the mass before it is below top_p.
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            keep &= before < p
            # The most likely token always stays (as in vLLM): a top_p that rounds to 0 in
            # float32 (1e-300) would otherwise keep nothing, and argmax of all zeros is token 0.
            # top_k >= 1 keeps it anyway, and min_p <= 1 never drops the maximum.
            keep[:, 0] = True
        sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
        return torch.zeros_like(probs).scatter_(1, order, sorted_probs)

    def _logprobs(
        self, raw: torch.Tensor, rows: list[SamplingRow], tokens: list[int]
    ) -> list[TokenLogprob | None]:
        wanted = [r.params.logprobs for r in rows]
        if all(w is None for w in wanted):
            return [None] * len(rows)
        logprobs = torch.log_softmax(raw, dim=-1)
        result: list[TokenLogprob | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                result.append(None)
                continue
            chosen = logprobs[i, tokens[i]]
            rank = int((logprobs[i] > chosen).sum()) + 1
            top: dict[int, float] = {}
            if n > 0:
                vals, ids = logprobs[i].topk(n)
                top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
            result.append(TokenLogprob(tokens[i], float(chosen), rank, top))
        return result


def row_seed(seed: int, position: int) -> int:
    """The generator seed for a seeded row's draw at output ``position``: one to one over int64
    seeds (SamplingParams refuses wider ones) at any position.

    An odd stride is a bijection mod 2**63, so non-negative seeds fill [0, 2**63) and draw as they
    always have; negative seeds take the upper half (reduced mod 2**63 alone, -1 drew as 2**63 - 1
    does). torch's CPU generator keeps only the low 32 bits of a seed, so on CPU seeds equal
    mod 2**32 still draw alike; CUDA's keeps all 64.
    """
    mixed = (seed * _SEED_STRIDE + position) % 2**63
    return mixed if seed >= 0 else mixed + 2**63


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    # max(dim).indices is ~1.7x faster than argmax on CPU and, like it, returns the
    # first of tied maxima.
    return logits.max(dim=-1).indices
