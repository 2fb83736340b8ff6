"""Entry point of the ``tokenmill`` command.

tokenmill serve                                  # OpenAI-compatible HTTP + gRPC on the demo model
tokenmill serve ./Llama-3.2-1B --port 8000 --api-key KEY
tokenmill generate "ROMEO:"                      # the embedded demo model
tokenmill generate --model ./Llama-3.2-1B --chat "Name three rivers."
tokenmill profile --model ./Llama-3.2-1B -o llama-1b.json   # step-time profile for max_itl and simulations
tokenmill bench run http://127.0.0.1:8000 --concurrency 8      # TTFT, ITL, throughput of any OpenAI server
tokenmill route --worker http://127.0.0.1:8000 --worker http://127.0.0.1:8001   # one endpoint, many workers
tokenmill keys create --team search --config gateway.yaml      # an API key for route --gateway-config
tokenmill batch run input.jsonl --url http://127.0.0.1:8000    # an OpenAI Batch file, paced and resumable
tokenmill eval questions.jsonl --endpoint full=URL --endpoint int8=URL   # compare models on your questions
tokenmill quantize ./Llama-3.2-1B --method int8 --out ./Llama-3.2-1B-int8   # quantize once, serve it ready
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from tokenmill.cli import bench_tools  # noqa: F401  (registers report, compare, calibrate, mock-server)
from tokenmill.cli.batch import app as batch_app
from tokenmill.cli.bench import app as bench_app
from tokenmill.cli.engine_options import AttentionBackend, BlockSize, KVCacheMemory, MaxModelLen
from tokenmill.cli.eval import eval_command
from tokenmill.cli.keys import app as keys_app
from tokenmill.cli.quantize import quantize
from tokenmill.cli.route import app as route_app
from tokenmill.cli.serve import KVCacheDtype, QuantizeLmHead, serve

app = typer.Typer(
    help="tokenmill: serve open LLMs on your own GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _error(message: str) -> None:
    """One line however narrow the terminal (a path in it stays whole, to copy), never read as markup."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


app.command()(serve)
app.add_typer(bench_app, name="bench")
app.add_typer(batch_app, name="batch")
app.command("eval")(eval_command)
app.command()(quantize)
app.add_typer(route_app, name="route")
app.add_typer(keys_app, name="keys")


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="Logging level: debug, info, warning, error.")] = "warning",
) -> None:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts; all run at once.")],
    model: Annotated[
        Path | None, typer.Option(help="Hugging Face model folder. Default: the embedded demo model.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = 128,
    temperature: Annotated[
        float | None, typer.Option(help="0 is greedy. Default: the model's generation_config.json.")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass in (0, 1].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens (0: all).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(help="Send each prompt as a user message (chat template).")] = False,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_model_len: MaxModelLen = None,
    kv_cache_memory: KVCacheMemory = None,
    quantization: Annotated[
        str | None, typer.Option(help="int8, int4 or fp8: weights quantized at load. Default: none.")
    ] = None,
    quantize_lm_head: QuantizeLmHead = None,
    kv_cache_dtype: Annotated[
        KVCacheDtype,
        typer.Option(help="auto (the model's dtype) or fp8: K, V in float8 e4m3 with scales (~2x tokens)."),
    ] = "auto",
    block_size: BlockSize = 16,
    attention_backend: AttentionBackend = "auto",
) -> None:
    """Generate text and stream it to the terminal."""
    from tokenmill.cli.generate import stdout_write, stream_generate
    from tokenmill.engine import Engine, EngineConfig, EngineError, SamplingParams

    kv: float | int | None = kv_cache_memory  # (parsed by its option's callback)
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    sampling = {name: value for name, value in given.items() if value is not None}
    try:
        # The options given are checked before the model loads (minutes, for a large one).
        SamplingParams(max_tokens=max_tokens, stop=list(stop or []), **sampling).validate()
        with err.status("loading model..."):
            engine = Engine(
                EngineConfig(
                    model=str(model) if model else None,
                    dtype=dtype,
                    device=device,
                    max_model_len=max_model_len,
                    kv_cache_memory=kv,
                    quantization=quantization,
                    quantize_lm_head=quantize_lm_head,
                    kv_cache_dtype=kv_cache_dtype,
                    block_size=block_size,
                    attention_backend=attention_backend,
                )
            )
        err.print(
            f"[dim]{engine.model_config.architecture} on {engine.device}, ready in "
            f"{engine.startup_seconds:.2f} s; {engine.kv_plan.summary()}[/dim]"
        )
        params = engine.default_sampling_params()
        params.max_tokens = max_tokens
        for name, value in sampling.items():
            setattr(params, name, value)
        params.stop = list(stop or [])
        inputs: list[str | list[int]] = list(prompts)
        if chat:
            inputs = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]

        def header(i: int, label: str) -> None:
            if i:
                stdout_write("\n\n")
            if len(prompts) > 1 or chat:
                err.print(f"[bold cyan]── {prompts[i] if chat else label}[/bold cyan]")
            if not chat:
                stdout_write(label)

        stream_generate(engine, inputs, params, stdout_write, header)
        stdout_write("\n")
    except EngineError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def profile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON profile.")],
    model: Annotated[
        Path | None, typer.Option(help="Hugging Face model folder. Default: the embedded demo model.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_model_len: MaxModelLen = None,
    repeats: Annotated[int, typer.Option(help="Runs of each workload.", min=1)] = 2,
    quick: Annotated[bool, typer.Option(help="Fewer, smaller workloads (seconds, rougher fit).")] = False,
) -> None:
    """Measure step times of a model on this machine and write a timing profile.

    The profile feeds chunked prefill under --max-itl and the simulated runner.
    """
    from rich.progress import Progress

    from tokenmill.engine import EngineConfig, EngineError
    from tokenmill.engine.profiler import profile_engine

    config = EngineConfig(
        model=str(model) if model else None, dtype=dtype, device=device, max_model_len=max_model_len
    )
    if not output.parent.is_dir():  # say so now, not after minutes of profiling
        _error(f"--output {output}: folder {output.parent} does not exist")
        raise typer.Exit(2)
    if output.is_dir():
        _error(f"--output {output} is a folder: give a file such as {output / 'p.json'}")
        raise typer.Exit(2)
    probe = output.with_name(f".{output.name}.probe")
    try:  # a folder it cannot write in (read-only, /proc) fails now too
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _error(f"--output {output}: cannot write in {output.parent}: {e.strerror or e}")
        raise typer.Exit(2) from None
    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("profiling", total=None)
            timing = profile_engine(
                config, quick=quick, repeats=repeats, progress=lambda s: bar.update(task, description=s)
            )
    except EngineError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    output.write_text(timing.to_json())
    if timing.fit["median_relative_error"] > 0.25:
        err.print(
            "[yellow]warning:[/yellow] the fit is poor (median error "
            f"{timing.fit['median_relative_error']:.0%}): was the machine busy? Profile on an idle one."
        )
    err.print(
        f"[green]wrote {output}[/green]: {timing.fit['samples']} steps, median error "
        f"{timing.fit['median_relative_error']:.1%}; overhead {timing.overhead_s * 1e3:.2f} ms, "
        f"{timing.per_token_s * 1e6:.1f} us/token, {timing.per_decode_s * 1e6:.1f} us/decode, "
        f"{timing.per_context_token_s * 1e9:.1f} ns/context token"
    )


if __name__ == "__main__":
    app()
