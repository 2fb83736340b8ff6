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

import shutil
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
        str,
        typer.Option(
            help="int8, int4 or fp8 (the same schemes as serve --quantization). int4 needs layers whose "
            "input size divides by 32, 64 or 128; the others stay plain."
        ),
    ] = "int8",
    out: Annotated[
        Path | None, typer.Option(help="Folder to write (required); must be empty or absent.")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="Quantize from this dtype, which the folder then loads in: auto (the checkpoint's), "
            "bfloat16, float16, float32."
        ),
    ] = "auto",
) -> None:
    """Quantize a model's linear layers and save it as a compressed-tensors checkpoint.

    The LM head stays plain in the file. Served, an int8 folder quantizes it as it loads, as
    --quantization int8 does; int4 and fp8 leave it plain (serve's --quantize-lm-head changes either).
    """
    # Imported here: the engine brings torch, which the CLI's other commands (route, bench) never load.
    from tokenmill.engine.config import parse_dtype
    from tokenmill.engine.errors import EngineError
    from tokenmill.engine.loader import check_model_folder, resolve_model_path
    from tokenmill.engine.quantization import QUANTIZATION_METHODS
    from tokenmill.engine.quantized_checkpoint_writer import save_quantized

    err = Console(stderr=True, soft_wrap=True)  # an error is one line, however narrow the terminal
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
        config = check_model_folder(src)  # what serve would refuse is refused now, before any work
        source_dtype = config.dtype if dtype == "auto" else parse_dtype(dtype)
    except (EngineError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    try:
        made = _make_folder(out)
    except OSError as e:
        err.print(f"[red]error:[/] --out {str(out)!r} cannot be created as a folder: {_why(out, e)}")
        raise typer.Exit(2) from None
    try:
        start = time.perf_counter()
        report = save_quantized(src, out, method, source_dtype)
    except BaseException as e:
        if made is not None:  # ours, made a moment ago: a failed run leaves nothing behind
            shutil.rmtree(made, ignore_errors=True)
        if not isinstance(e, (EngineError, ValueError, OSError)):
            raise
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


def _make_folder(out: Path) -> Path | None:
    """Make ``out`` and its missing parents now, before any work: a path that cannot be a folder
    (under a file, in /proc, without permission) fails here in one line rather than in a traceback
    after the quantizing. Returns the topmost folder made (None if ``out`` was there already)."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        if missing and missing[-1].is_dir():  # the parents made before the failure
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise
    return missing[-1] if missing else None


def _why(out: Path, e: OSError) -> str:
    file = next((p for p in out.parents if p.is_file()), None)
    if file is not None:
        return f"{str(file)!r} is a file"
    failed = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
    return f"{e.strerror or e}{failed}"
