"""Options every command that loads a model shares, read the same way by each: ``--kv-cache-memory``
(the KV pool as bytes, ``4GiB``, ``512MB``, ``2147483648``, or a fraction of the memory free after the
weights, ``0.5``), ``--max-model-len``, ``--block-size`` and ``--attention-backend``."""

from __future__ import annotations

import re
from typing import Annotated

import typer

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)
ALLOWED = (
    "a fraction in (0, 1] of the free memory, or bytes: a whole number above 1, or with a unit (4GiB, 512MB)"
)


def parse_kv_cache_memory(text: str | None) -> float | int | None:
    """A fraction stays a float, bytes become an int (the engine tells them apart by type)."""
    if text is None:
        return None
    m = _SIZE.fullmatch(text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not {ALLOWED}")
    number, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    if not m.group(2) and 0 < number <= 1:
        return number
    size = number * unit
    # 2.5 would have been read as 2 bytes: a number past 1 without a unit must be a whole one.
    if size <= 1 or (not m.group(2) and not number.is_integer()):
        raise typer.BadParameter(f"{text!r} is not {ALLOWED}")
    return int(size)


KVCacheMemory = Annotated[
    str | None,
    typer.Option(
        help="KV pool: bytes (a whole number, or 4GiB, 512MB) or a fraction (0, 1] of the memory free "
        "after the weights. Default: 0.9 of a GPU's free memory; 1GiB on CPU.",
        callback=parse_kv_cache_memory,
        metavar="SIZE|FRACTION",
    ),
]

MaxModelLen = Annotated[
    int | None,
    typer.Option(help="Longest sequence (prompt + output). Default: the model's max_position_embeddings."),
]

BlockSize = Annotated[int, typer.Option(help="Tokens per KV block.")]

AttentionBackend = Annotated[  # checked by EngineConfig, which names the allowed values
    str,
    typer.Option(help="auto, cpu (tokenmill's paged decode kernel) or reference (PyTorch SDPA; any device)."),
]
