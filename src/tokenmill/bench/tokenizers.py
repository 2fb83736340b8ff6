"""Counting and cutting tokens the way the server under test does: through its own
``/tokenize`` and ``/detokenize`` (tokenmill, vLLM and SGLang have them), or a local
``tokenizer.json`` when the server has none."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenmill.client import HTTPTransport


class TokenCounter(Protocol):
    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...


class LocalTokenizer:
    """A Hugging Face ``tokenizer.json`` (a file, or a model folder holding one)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"tokenizer must be a tokenizer.json or a folder holding one: {path} has none")
        self._tok = Tokenizer.from_file(str(p))

    async def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    async def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class ServerTokenizer:
    """The server's ``POST /tokenize`` and ``POST /detokenize`` (vLLM's request and response shapes)."""

    def __init__(self, http: HTTPTransport, model: str) -> None:
        self._http = http
        self._model = model

    async def encode(self, text: str) -> list[int]:
        body = {"model": self._model, "prompt": text, "add_special_tokens": False}
        response = await self._http.request("POST", "/tokenize", json=body)
        if response.status != 200:
            raise ValueError(f"the server's /tokenize answered {response.status}: {response.text[:200]}")
        return [int(t) for t in response.json()["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        response = await self._http.request("POST", "/detokenize", json={"model": self._model, "tokens": ids})
        if response.status != 200:
            raise ValueError(f"the server's /detokenize answered {response.status}: {response.text[:200]}")
        return str(response.json()["prompt"])


async def server_tokenizer(http: HTTPTransport, model: str) -> ServerTokenizer | None:
    """The server's tokenizer if it has the endpoints, else None."""
    tok = ServerTokenizer(http, model)
    try:
        await tok.encode("probe")
    except (ValueError, KeyError):
        return None
    return tok
