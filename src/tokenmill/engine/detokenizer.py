"""Incremental detokenization and stop strings.

Decoding one token at a time breaks words (byte-level BPE emits a multi-byte
character over several tokens; SentencePiece drops leading spaces without the
previous token). So each step decodes a short window ending at the new tokens
and keeps only the text after what that window decoded to before the new tokens
(the classic prefix/read offset scheme). A window that ends in U+FFFD is an
incomplete character: nothing is emitted until it completes.

Stop strings: text that could still become the start of a stop string is held
back, so a stream never shows text that is later cut. Before ``min_tokens``
output tokens no stop string ends a request, and text of those first tokens is
searched only where a stop string straddles into the tokens after them, as
vLLM does.
"""

from __future__ import annotations

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.tokenizer import Tokenizer

_PREFIX_WINDOW = 5  # earlier tokens re-decoded for context; enough for every BPE merge seen


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop = params.stop
        self.min_tokens = params.min_tokens
        self._num_tokens = 0  # output tokens so far, special ones included, as min_tokens counts them
        self.include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._special = tokenizer.special_token_ids if self.skip_special else frozenset()
        self.token_ids: list[int] = [t for t in prompt_token_ids[-_PREFIX_WINDOW:] if t not in self._special]
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)
        self.output_text = ""  # everything decoded so far (stop string already cut)
        self._emitted = 0  # chars of output_text already handed out
        self.stop_reason: str | None = None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; return the stop string if one was found (the text is cut there)."""
        searched = len(self.output_text)
        self._num_tokens += len(new_token_ids)
        for tid in new_token_ids:
            if tid in self._special:
                continue
            self.token_ids.append(tid)
            self.output_text += self._decode_next()
        if self.stop and self._num_tokens > self.min_tokens:
            return self._check_stop(max(0, searched - self._hold))
        return None

    def _decode_next(self) -> str:
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset], self.skip_special)
        full = self.tokenizer.decode(ids[self._prefix_offset :], self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
            return full[len(prefix) :]
        return ""

    def _check_stop(self, start: int) -> str | None:
        # Only text that the new tokens could have completed needs searching.
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.output_text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.output_text = self.output_text[: i + len(s) if self.include_stop else i]
        self.stop_reason = s
        return s

    def visible_text(self, finished: bool) -> str:
        """The text a caller may see now: all of it once finished, else without the tail
        that could still turn out to start a stop string."""
        if finished or not self.stop or self.stop_reason is not None:
            return self.output_text
        return self.output_text[: max(self._emitted, len(self.output_text) - self._hold)]

    def take_new_text(self, finished: bool) -> str:
        """Visible text not yet handed out (for DELTA outputs)."""
        visible = self.visible_text(finished)
        new = visible[self._emitted :]
        self._emitted = len(visible)
        return new
