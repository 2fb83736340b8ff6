"""What a run sends: prompts of known token lengths, from synthetic text or from files.

- ``synthetic``: random words (``bench/vocabulary.py``) cut to exactly
  ``prompt_tokens`` tokens by the server's tokenizer (or ``--tokenizer``); a
  different text per request, so no prefix is shared by chance.
- ``shared-prefix``: ``groups`` prefixes of ``prefix_tokens`` each (a number,
  or a range each prefix draws from), every request one of them (drawn at
  random, seeded) plus a unique suffix of ``prompt_tokens`` (for prefix
  caching and routing studies). On chat the prefix is the system message and
  the suffix the user's, as a multi-tenant fleet sees them; on completions
  they are one prompt, joined by a newline.
- ``multi-turn``: sessions of ``turns`` user messages of ``prompt_tokens``
  each; a turn goes out once the previous one's reply is in (after the run's
  think time), carrying the whole conversation so far, replies included.
- ``jsonl``: one JSON object per line, ``{"prompt": ...}`` or ``{"messages": [...]}``,
  with optional ``output_tokens`` and ``user``.
- ``sharegpt``: ShareGPT's JSON (``[{"conversations": [{"from": "human", "value": ...}, ...]}]``);
  the first human turn is the prompt, the reply's token count the output length.

Lengths are a number or a range ``lo:hi`` (uniform, seeded). Everything is
seeded: the same arguments build the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.tokenizers import TokenCounter
from tokenmill.bench.vocabulary import WORDS

SOURCES = ("synthetic", "shared-prefix", "multi-turn", "jsonl", "sharegpt")


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | None = None  # completions, or one user message for chat
    messages: list[dict[str, Any]] | None = None  # chat, when the data gives whole conversations
    prompt_tokens: int | None = None  # content tokens, when known
    output_tokens: int | None = None  # max_tokens to ask for (None: the run's default)
    user: str | None = None
    session: str | None = None  # turns of one session go in order, each with the replies before it


@dataclass(frozen=True)
class Length:
    """A token count: fixed, or uniform in [lo, hi]."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str | int, name: str) -> Length:
        try:
            if isinstance(text, int):
                lo = hi = text
            elif ":" in text:
                a, b = text.split(":", 1)
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(text)
        except ValueError:
            raise ValueError(f"{name} must be a number of tokens or a range lo:hi, got {text!r}") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"{name} must be >= 1 (and lo <= hi in a range), got {text!r}")
        return cls(lo, hi)

    def draw(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


async def exact_text(tok: TokenCounter, n: int, rng: random.Random, tries: int = 4) -> tuple[str, int]:
    """Random words cut to ``n`` tokens; returns the text and its count (``n`` unless the
    tokenizer would not cut cleanly at any of a few word sequences)."""
    best: tuple[str, int] = ("", 0)
    for _ in range(tries):
        words = " ".join(rng.choice(WORDS) for _ in range(n + 8))
        ids = (await tok.encode(words))[:n]
        while len(ids) < n:  # words of one token each at worst: this never runs twice
            ids += (await tok.encode(" " + " ".join(rng.choice(WORDS) for _ in range(n))))[: n - len(ids)]
        text = await tok.decode(ids)
        count = len(await tok.encode(text))
        if count == n:
            return text, n
        if abs(count - n) < abs(best[1] - n) or not best[0]:
            best = (text, count)
    return best


async def synthetic(
    tok: TokenCounter, num: int, prompt_tokens: Length, output_tokens: Length, seed: int
) -> list[RequestSpec]:
    rng = random.Random(seed)
    specs = []
    for _ in range(num):
        text, count = await exact_text(tok, prompt_tokens.draw(rng), rng)
        specs.append(RequestSpec(prompt=text, prompt_tokens=count, output_tokens=output_tokens.draw(rng)))
    return specs


async def shared_prefix(
    tok: TokenCounter,
    num: int,
    groups: int,
    prefix_tokens: Length,
    prompt_tokens: Length,
    output_tokens: Length,
    seed: int,
) -> list[RequestSpec]:
    if groups < 1:
        raise ValueError(f"--prefix-groups must be >= 1, got {groups}")
    rng = random.Random(seed)
    prefixes = [await exact_text(tok, prefix_tokens.draw(rng), rng) for _ in range(groups)]
    specs = []
    for _ in range(num):
        group = rng.randrange(groups)  # drawn, not taken in turn: a turn order would line up with round robin
        prefix = prefixes[group][0]
        suffix = (await exact_text(tok, prompt_tokens.draw(rng), rng))[0]
        text = f"{prefix}\n{suffix}"
        specs.append(
            RequestSpec(
                prompt=text,
                messages=[{"role": "system", "content": prefix}, {"role": "user", "content": suffix}],
                prompt_tokens=len(await tok.encode(text)),
                output_tokens=output_tokens.draw(rng),
                user=f"group-{group}",
            )
        )
    return specs


async def multi_turn(
    tok: TokenCounter, num: int, turns: int, prompt_tokens: Length, output_tokens: Length, seed: int
) -> list[RequestSpec]:
    """``num`` requests as sessions of ``turns`` turns (the last session may be shorter)."""
    if turns < 1:
        raise ValueError(f"--turns must be >= 1, got {turns}")
    rng = random.Random(seed)
    specs = []
    for i in range(num):
        session = f"session-{i // turns}"
        text, count = await exact_text(tok, prompt_tokens.draw(rng), rng)
        specs.append(RequestSpec(text, None, count, output_tokens.draw(rng), session, session))
    return specs


def from_jsonl(path: Path, num: int | None) -> list[RequestSpec]:
    specs = []
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                specs.append(_jsonl_spec(line, f"{path}:{lineno}"))
                if num is not None and len(specs) == num:
                    break
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text after line {lineno} (is it the right file?)") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: give the JSONL file in it") from None
    if not specs:
        raise ValueError(f"{path} has no requests")
    return specs


def _jsonl_spec(line: str, where: str) -> RequestSpec:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or _is_chat(row.get("messages"))):
        raise ValueError(
            f'{where}: needs "prompt" (a string) or "messages" (a list of messages, each with a string '
            '"role" and its "content")'
        )
    for name in ("output_tokens", "prompt_tokens"):
        count = row.get(name)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {count!r}")
    prompt, messages, user = row.get("prompt"), row.get("messages"), row.get("user")
    return RequestSpec(prompt, messages, row.get("prompt_tokens"), row.get("output_tokens"), user)


async def from_sharegpt(path: Path, num: int, tok: TokenCounter | None, seed: int) -> list[RequestSpec]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (is it the right file?)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not ShareGPT JSON: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: ShareGPT JSON is a list of conversations")
    random.Random(seed).shuffle(rows)
    specs = []
    for row in rows:
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        human, reply = turns[0], turns[1]
        if not (isinstance(human, dict) and isinstance(reply, dict)) or human.get("from") != "human":
            continue
        prompt, answer = str(human.get("value", "")), str(reply.get("value", ""))
        if not prompt or not answer:
            continue
        prompt_tokens = output_tokens = None
        if tok is not None:
            prompt_tokens = len(await tok.encode(prompt))
            output_tokens = max(1, len(await tok.encode(answer)))
        specs.append(
            RequestSpec(
                prompt, None, prompt_tokens, output_tokens, str(row.get("id")) if "id" in row else None
            )
        )
        if len(specs) == num:
            break
    if not specs:
        raise ValueError(f"{path} holds no conversation that starts with a human turn and a reply")
    return specs


def _is_chat(messages: Any) -> bool:
    """Messages a server takes: a role each, and content (text, or parts) unless the assistant's."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and (isinstance(m.get("content"), str | list) or m.get("role") == "assistant")
            for m in messages
        )
    )
