"""Builds a run's requests from the command line's data options (``tokenmill bench run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench import data
from tokenmill.bench.tokenizers import LocalTokenizer, TokenCounter, server_tokenizer
from tokenmill.client import HTTPTransport, TransportError


@dataclass(frozen=True)
class DataSource:
    """The data options of ``tokenmill bench run``."""

    kind: str  # one of data.SOURCES
    prompt_tokens: data.Length
    output_tokens: data.Length
    file: Path | None = None  # jsonl, sharegpt
    tokenizer: Path | None = None  # None: the server's /tokenize
    groups: int = 4  # shared-prefix
    prefix_tokens: data.Length = field(default_factory=lambda: data.Length(512, 512))  # shared-prefix
    trace: list[dict[str, Any]] | None = None  # rows of a trace, whose lengths synthetic data follows
    turns: int = 3  # multi-turn: turns per session

    def __post_init__(self) -> None:
        if self.kind not in data.SOURCES:
            raise ValueError(f"--data must be one of {', '.join(data.SOURCES)}, got {self.kind!r}")
        if self.kind in ("jsonl", "sharegpt") and self.file is None:
            raise ValueError(f"--data {self.kind} needs --data-file FILE")
        if self.kind not in ("jsonl", "sharegpt") and self.file is not None:
            raise ValueError(f"--data-file goes with --data jsonl or sharegpt, not --data {self.kind}")
        if self.file is not None and self.file.is_dir():
            raise ValueError(f"--data-file {self.file} is a folder: give the {self.kind} file in it")
        if self.file is not None and not self.file.is_file():
            raise ValueError(f"--data-file {self.file}: no such file")

    def check_context(self, max_model_len: int | None) -> None:
        """Raise ValueError when the longest request these options make cannot fit the model's
        context (``max_model_len`` from the server's /v1/models; None: not known, not checked):
        the server would refuse every such request, and building a prompt of a million tokens
        would take minutes and gigabytes first. (A chat template's few tokens are not counted.)"""
        if max_model_len is None or self.kind in ("jsonl", "sharegpt"):
            return
        p, o = self.prompt_tokens.hi, self.output_tokens.hi
        lengths = f"--prompt-tokens {self.prompt_tokens} + --output-tokens {self.output_tokens}"
        if self.trace and self.kind == "synthetic":
            longest = max(r.get("input_tokens", p) + r.get("output_tokens", o) for r in self.trace)
            what = f"the trace's longest request, {longest} tokens,"
        elif self.kind == "shared-prefix":
            longest = self.prefix_tokens.hi + p + o
            what = f"--prefix-tokens {self.prefix_tokens} + {lengths}"
        elif self.kind == "multi-turn":  # the last turn carries the whole session before it
            longest = self.turns * (p + o)
            what = f"{self.turns} turns of {lengths}"
        else:
            longest, what = p + o, lengths
        if longest > max_model_len:
            raise ValueError(
                f"{what} (up to {longest} tokens) is past the model's context of {max_model_len} tokens "
                "(max_model_len at /v1/models): the server would refuse those requests; shorten them"
            )

    def describe(self) -> str:
        p, o = self.prompt_tokens, self.output_tokens
        if self.trace and self.kind == "synthetic":
            whole = all("input_tokens" in r and "output_tokens" in r for r in self.trace)
            lengths = "the trace's lengths" + ("" if whole else f" (else {p} -> {o} tokens)")
            return f"trace replay of {len(self.trace)} requests, synthetic text of {lengths}"
        if self.kind == "synthetic":
            return f"synthetic {p} -> {o} tokens"
        if self.kind == "shared-prefix":
            return f"{self.groups} prefixes of {self.prefix_tokens} + {p} -> {o} tokens"
        if self.kind == "multi-turn":
            return f"sessions of {self.turns} turns of {p} -> {o} tokens"
        return f"{self.kind} {self.file}"


async def build_specs(
    http: HTTPTransport, model: str, source: DataSource, n: int, seed: int
) -> list[data.RequestSpec]:
    kind, prompt, output = source.kind, source.prompt_tokens, source.output_tokens
    if kind == "jsonl":
        assert source.file is not None
        return data.from_jsonl(source.file, n)
    tok = await _tokenizer(http, model, source.tokenizer, required=kind != "sharegpt")
    if kind == "sharegpt":
        assert source.file is not None
        return await data.from_sharegpt(source.file, n, tok, seed)
    assert tok is not None
    if source.trace and kind == "synthetic":  # the trace's own lengths where it gives them
        specs = []
        for i, row in enumerate(source.trace[:n]):
            p = data.Length(row["input_tokens"], row["input_tokens"]) if "input_tokens" in row else prompt
            o = data.Length(row["output_tokens"], row["output_tokens"]) if "output_tokens" in row else output
            specs += await data.synthetic(tok, 1, p, o, seed + i)
        return specs
    if kind == "multi-turn":
        return await data.multi_turn(tok, n, source.turns, prompt, output, seed)
    if kind == "shared-prefix":
        return await data.shared_prefix(tok, n, source.groups, source.prefix_tokens, prompt, output, seed)
    return await data.synthetic(tok, n, prompt, output, seed)


async def _tokenizer(
    http: HTTPTransport, model: str, path: Path | None, required: bool
) -> TokenCounter | None:
    if path is not None:
        return LocalTokenizer(path)
    tok = await server_tokenizer(http, model)
    if tok is None and required:
        raise ValueError("the server has no /tokenize to count prompt tokens with: pass --tokenizer PATH")
    return tok


def check_endpoint(specs: list[data.RequestSpec], endpoint: str) -> None:
    """The completions endpoint takes a prompt: conversations (``messages`` only) need chat."""
    if endpoint == "completions":
        for i, spec in enumerate(specs):
            if spec.prompt is None:
                raise ValueError(
                    f"--endpoint completions needs prompts, but request {i + 1} of the data has only "
                    '"messages": use --endpoint chat'
                )


async def retokenize(
    http: HTTPTransport, model: str, source: DataSource, replies: dict[int, str], records: list[Any]
) -> str | None:
    """Count each kept reply's tokens again and note it on its record (the server's usage stays the
    figure; this is the check). Skipped when no tokenizer is at hand. A tokenizer that fails (the
    server went away, say) ends the check, not the run: the returned note says so."""
    if not replies:
        return None
    by_index = {r.index: r for r in records}
    done = 0
    try:
        tok = await _tokenizer(http, model, source.tokenizer, required=False)
        if tok is None:
            return None
        for index, text in replies.items():
            if index in by_index:
                by_index[index].retokenized_output_tokens = len(await tok.encode(text))
                done += 1
    except (TransportError, ValueError, KeyError, TypeError) as e:
        return f"token check stopped after {done} of {len(replies)} replies: {type(e).__name__}: {e}"
    return None
