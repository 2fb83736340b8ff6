"""``tokenmill quantize``: quantize a model once and save it, so workers load it ready to run.

    tokenmill quantize ./Llama-3.1-8B-Instruct --method int8 --out ./Llama-3.1-8B-Instruct-int8
    tokenmill serve ./Llama-3.1-8B-Instruct-int8

The folder is a compressed-tensors checkpoint (what vLLM reads too); tokenmill
loads it without re-quantizing, and runs it exactly as ``--quantization int8``
on the original would (quantized_checkpoint.py). The LM head stays plain in the
file, where vLLM expects it; an int8 model's head is quantized as it loads (a
fraction of a second), as it is for ``--quantization int8``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

MiB = float(1 << 20)


def quantize(
    model: Annotated[
        Path | None, typer.Argument(help="Hugging Face model folder. Default: the embedded demo model.")
    ] = None,
    method: Annotated[
        str, typer.Option(help="int8, int4 or fp8 (the same schemes as serve --quantization).")
    ] = "int8",
    out: Annotated[Path | None, typer.Option(help="Folder to write; must be empty or absent.")] = None,
    dtype: Annotated[
        str,
        typer.Option(help="Quantize from this dtype: auto (the checkpoint's), bfloat16, float16, float32."),
    ] = "auto",
) -> None:
    """Quantize every linear layer but the LM head and save the model as a compressed-tensors checkpoint."""
    # Imported here: the engine brings torch, which the CLI's other commands (route, bench) never load.
    from tokenmill.engine.config import ModelConfig, parse_dtype
    from tokenmill.engine.errors import EngineError
    from tokenmill.engine.loader import resolve_model_path
    from tokenmill.engine.quantization import QUANTIZATION_METHODS
    from tokenmill.engine.quantized_checkpoint_writer import save_quantized

    err = Console(stderr=True)
    if method not in QUANTIZATION_METHODS:
        err.print(f"[red]error:[/] --method {method!r} is invalid: allowed {', '.join(QUANTIZATION_METHODS)}")
        raise typer.Exit(2)
    if out is None:
        err.print("[red]error:[/] --out is required: the folder to write the quantized model to")
        raise typer.Exit(2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        err.print(f"[red]error:[/] --out {str(out)!r} exists and is not an empty folder")
        raise typer.Exit(2)
    src = resolve_model_path(model)
    try:
        config = ModelConfig.from_pretrained(src)
        source_dtype = config.dtype if dtype == "auto" else parse_dtype(dtype)
        start = time.perf_counter()
        report = save_quantized(src, out, method, source_dtype)
    except (EngineError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    seconds = time.perf_counter() - start
    plain = (
        f", {len(report.plain_layers)} left plain (no int4 group size fits)" if report.plain_layers else ""
    )
    Console().print(
        f"quantized {report.quantized_layers} linear layers to {method}{plain} in {seconds:.2f} s: "
        f"{report.bytes_before / MiB:.1f} MiB -> {report.bytes_after / MiB:.1f} MiB, written to {out}\n"
        f"serve it with: tokenmill serve {out}"
    )
