"""The engine's per-token logprobs in OpenAI's two shapes: completions' and chat's."""

from __future__ import annotations

from functools import lru_cache

from tokenmill.engine.outputs import TokenLogprob
from tokenmill.engine.tokenizer import Tokenizer


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self._token_text = lru_cache(maxsize=65536)(self._decode)
        self._tokenizer = tokenizer

    def _decode(self, token_id: int) -> str:
        # One token's text; a piece of a multi-byte character shows as U+FFFD, as in vLLM.
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, logprobs: list[TokenLogprob], text_offset: int) -> dict:
        """OpenAI completions ``logprobs``: parallel lists, offsets into the choice's text."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = text_offset
        for lp in logprobs:
            text = self._token_text(lp.token_id)
            tokens.append(text)
            token_logprobs.append(lp.logprob)
            alternatives = {self._token_text(tid): v for tid, v in lp.top.items()}
            alternatives.setdefault(text, lp.logprob)
            top.append(alternatives)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chat(self, logprobs: list[TokenLogprob], num_top: int) -> dict:
        """OpenAI chat ``logprobs``: one entry per token with its top alternatives and UTF-8 bytes."""
        content = []
        for lp in logprobs:
            text = self._token_text(lp.token_id)
            top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:num_top]
            content.append(
                {
                    "token": text,
                    "logprob": lp.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": (t := self._token_text(tid)), "logprob": v, "bytes": list(t.encode())}
                        for tid, v in top
                    ],
                }
            )
        return {"content": content}
