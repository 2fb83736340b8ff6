"""Tokenizer and chat template, read from a Hugging Face folder without transformers.

``tokenizer.json`` is run by the ``tokenizers`` library; ``tokenizer_config.json``
supplies special tokens and the chat template, which is rendered with jinja2 the
way transformers renders it (trim_blocks, lstrip_blocks, a sandbox,
``raise_exception``, ``tojson``, ``strftime_now``), so prompts match token for
token.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tokenmill.engine.errors import InvalidRequestError, ModelLoadError, PromptTooLongError

ChatMessage = dict[str, Any]
# From this many characters a text is encoded by tokenizers' batch call, which lets go of the GIL
# while it works (its single-text call holds it: 2.5 s a megabyte here, during which the engine's
# step thread, and an event loop, could not run a line). Below it, the batch call's cost shows.
_RELEASE_GIL_CHARS = 4096


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"model folder {str(folder)!r} has no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self._load_chat_template(folder)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        # Set by the engine: a text certain to be longer is refused before it is tokenized.
        self.max_model_len: int | None = None

    @staticmethod
    def _load_chat_template(folder: Path) -> str | None:
        # transformers 4.43+ may keep it in chat_template.jinja beside the config.
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        cfg_path = folder / "tokenizer_config.json"
        template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.is_file() else None
        if isinstance(template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def backend(self) -> HFTokenizer:
        """The ``tokenizers`` object itself, for callers that batch or split text their own way."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(tid for tid, tok in self._tok.get_added_tokens_decoder().items() if tok.special)

    @cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token stands for (byte-level tokens: bytes, which are
        at least as many as characters), or None when a normalizer may drop text, and a text's
        length then bounds nothing."""
        if self._tok.normalizer is not None:
            return None
        return max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """``field``: what the text is in the caller's API, for errors."""
        self._check_length(text)
        try:
            if isinstance(text, str) and len(text) >= _RELEASE_GIL_CHARS:
                return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # tokenizers' answer to a lone surrogate (a JSON "\ud800" escape)
            if isinstance(text, str) and not utf8_encodable(text):
                raise InvalidRequestError(
                    field, "<text>", "text without unpaired surrogates (\\uD800-\\uDFFF escapes)"
                ) from None
            raise

    def _check_length(self, text: str) -> None:
        """Tokenizing holds the GIL, about 2.5 s a megabyte here: a worker's event loop would stop
        (health checks time out) for a prompt that can only be refused. A text with more characters
        than ``max_model_len`` tokens can stand for is refused at once."""
        limit, per_token = self.max_model_len, self.max_token_chars
        if limit is not None and per_token and len(text) > limit * per_token:
            raise PromptTooLongError(-(-len(text) // per_token), limit, at_least=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def tokens_to_string(self, tokens: list[str]) -> str:
        return self._tok.decoder.decode(tokens) if self._tok.decoder else "".join(tokens)

    def apply_chat_template(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render messages to the prompt text the model was trained on.

        ``continue_final_message``: leave the final (assistant) message open, without its end of
        turn, so the model continues it (a prefill), as transformers and vLLM do.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                "messages",
                "<chat>",
                "a model with a chat template (this one has none: "
                "send a plain prompt, or pass chat_template)",
            )
        _check_messages(messages)
        if continue_final_message:
            _check_continuable(messages, add_generation_prompt)
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
        }
        clash = sorted(variables.keys() & kwargs.keys())
        if clash:  # (set here, from the call and the tokenizer)
            raise InvalidRequestError(
                f"chat_template_kwargs.{clash[0]}",
                kwargs[clash[0]],
                f"template variables other than {', '.join(variables)}",
            )
        try:
            text = _compile(template).render(**variables, **kwargs)
        except jinja2.TemplateError as e:  # raise_exception, and the sandbox's SecurityError
            raise InvalidRequestError(
                "messages", "<chat>", f"messages the chat template accepts ({e})"
            ) from e
        except Exception as e:
            # The sandbox's limits (OverflowError: a range over 100,000) and the template's own
            # errors on values it did not expect: what the caller sent, not a fault of the server.
            field = "chat_template_kwargs" if kwargs else "messages"
            raise InvalidRequestError(
                field,
                "<chat>",
                "",
                message=f"the chat template failed on these {field}: {type(e).__name__}: {str(e)[:200]}",
            ) from e
        return _cut_after_final(text, messages[-1]["content"]) if continue_final_message else text

    def encode_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        # The template already writes the BOS text; adding specials again would double it.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False, field="messages")


def utf8_encodable(text: str) -> bool:
    """False when ``text`` holds an unpaired surrogate (a JSON "\\ud800" escape decodes to one).
    (``protocol/text.py`` has the same for the fronts: the engine imports nothing above it.)"""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # AddedToken serialised as a dict
        return token.get("content")
    return token


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", messages, "a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}]", m, "an object with a string 'role'")


def _check_continuable(messages: list[ChatMessage], add_generation_prompt: bool) -> None:
    if add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message",
            True,
            "true only with add_generation_prompt false (the final message goes on; no new one starts)",
        )
    final = messages[-1]
    if final.get("role") != "assistant":
        raise InvalidRequestError(
            "continue_final_message", True, "true only when the final message is the assistant's"
        )
    content = final.get("content")
    if not isinstance(content, str) or not content.strip():
        raise InvalidRequestError(
            f"messages[{len(messages) - 1}].content", content, "text to continue (continue_final_message)"
        )


def _cut_after_final(text: str, content: str) -> str:
    """``text`` up to the end of the final message's content (transformers' way: templates write
    the end of turn right after it; one that trims spaces around it is allowed for)."""
    stripped = content.strip()
    at = text.rfind(stripped)
    if at < 0:
        raise InvalidRequestError(
            "messages",
            "<chat>",
            "",
            message="continue_final_message: the chat template does not write the final message's "
            "content as given (it changes or drops it), so it cannot be continued",
        )
    kept = content.lstrip()
    end = at + len(kept) if text[at : at + len(kept)] == kept else at + len(stripped)
    return text[:end]


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    compiled = _TEMPLATES.get(template)
    if compiled is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        compiled = _TEMPLATES[template] = env.from_string(template)
    return compiled
