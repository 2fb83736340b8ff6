"""Counting and cutting tokens the way the server under test does: through its own
``/tokenize`` and ``/detokenize`` (tokenmill, vLLM and SGLang have them), or a local
``tokenizer.json`` when the server has none."""

from __future__ import annotations

import json
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
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({str(e)[:200]})") from None

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
            raise TokenizeRefused("/tokenize", response.status, response.text)
        return [int(t) for t in response.json()["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        response = await self._http.request("POST", "/detokenize", json={"model": self._model, "tokens": ids})
        if response.status != 200:
            raise TokenizeRefused("/detokenize", response.status, response.text)
        return str(response.json()["prompt"])


class TokenizeRefused(ValueError):
    """The server answered its tokenizer endpoint with an error status."""

    def __init__(self, path: str, status: int, body: str) -> None:
        from tokenmill.bench.responses import error_message

        self.status = status
        self.message = error_message(body)
        self.model_not_found = status == 404 and _names_the_model(body)
        super().__init__(f"the server's {path} answered {status}: {self.message[:200]}")

    @property
    def refused(self) -> bool:
        """The endpoint is there but refused this client (key) or this model: a tokenizer
        elsewhere would not help, the option that is wrong would."""
        return self.status in (401, 403) or self.model_not_found


async def server_tokenizer(http: HTTPTransport, model: str) -> ServerTokenizer | None:
    """The server's tokenizer if it has the endpoints, else None. A server that has them but
    refuses the key or the model is an error that says so, not a missing endpoint."""
    tok = ServerTokenizer(http, model)
    try:
        await tok.encode("probe")
    except TokenizeRefused as e:
        if e.status in (401, 403):
            raise ValueError(f"{e}: check --api-key") from None
        if e.model_not_found:
            raise ValueError(f"{e}: check --model") from None
        return None
    except (ValueError, KeyError, TypeError):
        return None
    return tok


def _names_the_model(body: str) -> bool:
    """A 404 about the model (OpenAI's error shape), not about the path."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and (
        error.get("code") == "model_not_found" or error.get("param") == "model"
    )
