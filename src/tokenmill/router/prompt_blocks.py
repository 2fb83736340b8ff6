"""A prompt's KV block hashes exactly as a tokenmill worker names them (the ``kv`` policy).

A worker names each full KV block of a prompt by a chained hash of its token
ids (``tokenmill.engine.block_hash``) and publishes the names it stores and
evicts. To look a new prompt up in those events the router needs the very same
token ids, so it renders chat messages with the model's own chat template and
tokenizes with the model's own tokenizer (``tokenmill.engine.tokenizer`` and
``block_hash`` are torch-free; the router imports nothing else of the engine).

Tokenizing is the costly part (a 32k-token prompt takes ~50 ms), and what is
costly to tokenize is what requests share: system prompts, documents, earlier
turns. The ``tokenizers`` library cuts text at added tokens (``<|im_end|>``,
``<|eot_id|>``) before anything else and tokenizes the pieces apart, so text
cut just after an added token tokenizes piece by piece to the same ids. A memo
keyed by the chain of pieces keeps, at each cut, the token count, the block
hashes so far and the ids of the unfinished block; a request starts from its
longest memoized cut and tokenizes and hashes only what follows. Long pieces
are tokenized off the event loop (``encode_batch`` releases the GIL).

Exactness is checked, not assumed: a pre-tokenizer that treats the text's
first piece apart (Metaspace's ``prepend_scheme="first"``) turns cutting off,
and so does any difference on probe texts tokenized both whole and in pieces;
then every prompt is tokenized whole. The memo key is
Python's 64-bit string hash: a collision could misplace one request's route,
never its output, since the worker tokenizes for itself.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.block_hash import ROOT_PARENT_HASH, hash_blocks
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.protocol.chat import ChatMessage

MEMO_BLOCKS = 1_000_000  # block hashes kept in the memo, all entries together (~40 MB)
OFFLOAD_CHARS = 2_048  # new text past this is tokenized in a thread, not on the event loop
MAX_WARMING = 4  # prompts tokenized in the background at once; more are not memoized


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """What a worker would cache of a prompt: its length and the hashes of its full blocks."""

    num_tokens: int
    hashes: list[int]
    block_size: int


@dataclass(frozen=True, slots=True)
class _Cut:
    """The state after some leading pieces: enough to continue tokenizing and hashing from there."""

    num_tokens: int
    hashes: list[int]
    tail: list[int]  # ids after the last full block


class PromptHasher:
    """Request body -> ``PromptBlocks``, with a memo of shared prefixes."""

    def __init__(self, tokenizer: Tokenizer, memo_blocks: int = MEMO_BLOCKS) -> None:
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._memo: OrderedDict[tuple[int, int], _Cut] = OrderedDict()
        self._memo_blocks = 0
        self.memo_limit = memo_blocks
        self.memo_hits = 0
        self._warming: dict[tuple[int, int], asyncio.Task[PromptBlocks]] = {}
        self._bos, self._eos = _added_around(tokenizer)
        cut_tokens = _cut_tokens(tokenizer)
        self._cut_at = re.compile("|".join(map(re.escape, cut_tokens))) if cut_tokens else None
        if self._cut_at is not None and (
            _first_piece_apart(tokenizer) or not self._pieces_are_exact(cut_tokens[:4])
        ):
            self._cut_at = None

    # -- requests ------------------------------------------------------------------------------

    async def blocks(
        self, request: dict[str, Any], block_size: int, wait: bool = True
    ) -> PromptBlocks | None:
        """The blocks of a chat or completions body; None when the body is not one the worker would
        accept (it answers the 400 itself; the router routes such a request by load).

        With ``wait=False`` a prompt with more than ``OFFLOAD_CHARS`` of text the memo does not
        hold also gives None, at once: its tokenizing goes on in the background, so the next
        request with the same prefix finds it, and this one is routed without waiting for it."""
        try:
            prompt = _prompt_of(request, self.tokenizer)
        except (ValueError, TypeError, KeyError):
            return None
        salt = request.get("cache_salt")
        salt = salt if isinstance(salt, str) and salt else None
        if isinstance(prompt, list):
            return PromptBlocks(len(prompt), hash_blocks(prompt, block_size, salt), block_size)
        text, add_special = prompt
        try:
            return await self.text_blocks(text, add_special, block_size, salt, wait)
        except (ValueError, TypeError):  # text the tokenizer refuses (a lone surrogate): the worker's 400
            return None

    async def text_blocks(
        self, text: str, add_special: bool, block_size: int, salt: str | None = None, wait: bool = True
    ) -> PromptBlocks | None:
        pieces = self._pieces(text)
        keys = _chain_keys(pieces, (add_special, salt, block_size))
        start, cut = len(pieces), None
        while start > 0:  # the longest memoized run of leading pieces
            cut = self._memo.get(keys[start - 1])
            if cut is not None:
                self._memo.move_to_end(keys[start - 1])
                self.memo_hits += 1
                break
            start -= 1
        if cut is None:
            cut = _extend(_Cut(0, [], []), list(self._bos) if add_special else [], block_size, salt)
        rest = pieces[start:]
        if not wait and sum(map(len, rest)) > OFFLOAD_CHARS:
            whole = keys[-1]
            warm = self._cut_at is not None and len(rest) > 1  # else nothing reusable to memoize
            if warm and whole not in self._warming and len(self._warming) < MAX_WARMING:
                task = asyncio.create_task(
                    self._finish(cut, rest, keys[start:], block_size, salt, add_special)
                )
                self._warming[whole] = task
                task.add_done_callback(lambda t: self._warmed(whole, t))
            return None
        return await self._finish(cut, rest, keys[start:], block_size, salt, add_special)

    async def _finish(
        self,
        cut: _Cut,
        rest: list[str],
        keys: list[tuple[int, int]],
        block_size: int,
        salt: str | None,
        add_special: bool,
    ) -> PromptBlocks:
        """Tokenize and hash the pieces after ``cut``, memoizing each new cut."""
        encoded = await self._encode(rest)
        for i, ids in enumerate(encoded):
            cut = _extend(cut, ids, block_size, salt)
            if cut.num_tokens >= block_size and self._cut_at is not None:
                self._remember(keys[i], cut)
        if add_special and self._eos:
            cut = _extend(cut, list(self._eos), block_size, salt)
        return PromptBlocks(cut.num_tokens, cut.hashes, block_size)

    def _warmed(self, whole: tuple[int, int], task: asyncio.Task[PromptBlocks]) -> None:
        self._warming.pop(whole, None)
        if not task.cancelled():
            task.exception()  # text the tokenizer refused: nothing to memoize, and nothing to log

    # -- pieces ----------------------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str]:
        if self._cut_at is None:
            return [text]
        pieces, start = [], 0
        for match in self._cut_at.finditer(text):
            pieces.append(text[start : match.end()])
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    async def _encode(self, pieces: list[str]) -> list[list[int]]:
        if not pieces:
            return []
        if sum(map(len, pieces)) > OFFLOAD_CHARS:
            encodings = await asyncio.to_thread(self._backend.encode_batch, pieces, add_special_tokens=False)
        else:
            encodings = self._backend.encode_batch(pieces, add_special_tokens=False)
        return [e.ids for e in encodings]

    def _remember(self, key: tuple[int, int], cut: _Cut) -> None:
        if key in self._memo:
            return
        self._memo[key] = cut
        self._memo_blocks += len(cut.hashes) + 1
        while self._memo_blocks > self.memo_limit and self._memo:
            _, old = self._memo.popitem(last=False)
            self._memo_blocks -= len(old.hashes) + 1

    def _pieces_are_exact(self, cut_tokens: list[str]) -> bool:
        """Tokenizing in pieces gives the whole text's ids on probe texts."""
        probes = []
        for s in cut_tokens:
            probes += [
                f"System: be brief.{s}\nuser\n  Hello, world!{s}  \n\n x{s}{s}end",
                f"{s} leading space{s}\ttab{s}ünïcödé 42{s}",
            ]
        for probe in probes:
            whole = self._backend.encode(probe, add_special_tokens=False).ids
            pieces = self._backend.encode_batch(self._pieces(probe), add_special_tokens=False)
            pieced = [i for e in pieces for i in e.ids]
            if whole != pieced:
                return False
        return True


def _prompt_of(request: dict[str, Any], tokenizer: Tokenizer) -> list[int] | tuple[str, bool]:
    """Token ids, or (text, add special tokens), as the worker would build the prompt."""
    if "messages" in request:
        messages = request["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages")
        rendered = [ChatMessage.model_validate(m).template_dict() for m in messages]
        kwargs = request.get("chat_template_kwargs") or {}
        add_generation_prompt = request.get("add_generation_prompt", True)
        text = tokenizer.apply_chat_template(rendered, bool(add_generation_prompt), **kwargs)
        return text, False  # the template writes the BOS text itself
    prompt = request["prompt"]
    if isinstance(prompt, list) and prompt:  # a batch, or token ids: route by the first prompt
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return _ids(prompt)
        prompt = first
        if isinstance(prompt, list):
            return _ids(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt")
    return prompt, True


def _ids(values: Sequence[Any]) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("prompt")
    return list(values)


def _extend(cut: _Cut, ids: list[int], block_size: int, salt: str | None) -> _Cut:
    tail = cut.tail + ids
    full = len(tail) // block_size * block_size
    if not full:
        return _Cut(cut.num_tokens + len(ids), cut.hashes, tail)
    parent = cut.hashes[-1] if cut.hashes else ROOT_PARENT_HASH
    new = hash_blocks(tail[:full], block_size, salt if not cut.hashes else None, parent=parent)
    return _Cut(cut.num_tokens + len(ids), cut.hashes + new, tail[full:])


def _chain_keys(pieces: list[str], seed: tuple[Any, ...]) -> list[tuple[int, int]]:
    """Per run of leading pieces, a key naming them all: (chained hash, characters)."""
    keys, h, n = [], hash(seed), 0
    for piece in pieces:
        h = hash((h, piece))
        n += len(piece)
        keys.append((h, n))
    return keys


def _cut_tokens(tokenizer: Tokenizer) -> list[str]:
    """Added tokens that the library matches on the raw text and strips nothing around: cutting
    just after one cannot change how either side tokenizes. Longest first, as the library
    matches."""
    safe = [
        t.content
        for t in tokenizer.backend.get_added_tokens_decoder().values()
        if t.content and not (t.lstrip or t.rstrip or t.single_word or t.normalized)
    ]
    return sorted(safe, key=len, reverse=True)


def _first_piece_apart(tokenizer: Tokenizer) -> bool:
    """A pre-tokenizer that prepends "▁" to the text's first piece only (Metaspace with
    ``prepend_scheme="first"``): a cut-off piece would be tokenized as if it came first."""

    def first(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("prepend_scheme") == "first" or any(map(first, node.values()))
        return isinstance(node, list) and any(map(first, node))

    return first(json.loads(tokenizer.backend.to_str()).get("pre_tokenizer"))


def _added_around(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the post-processor puts before and after a prompt (BOS, EOS) when asked for
    special tokens, found by encoding a probe both ways."""
    bare = tokenizer.backend.encode("probe", add_special_tokens=False).ids
    full = tokenizer.backend.encode("probe", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return tuple(full[:i]), tuple(full[i + len(bare) :])
    return (), ()
