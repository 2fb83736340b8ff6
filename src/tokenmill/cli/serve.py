"""``tokenmill serve``: one worker with OpenAI-compatible HTTP, gRPC and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from tokenmill.cli.engine_options import AttentionBackend, BlockSize, KVCacheMemory, MaxModelLen
from tokenmill.cli.event_loop import run_fast

err = Console(stderr=True)

# engine.config.KV_CACHE_DTYPES, spelled out: importing the engine (torch) here would slow every
# command's start. As a Literal, a bad value exits 2 naming --kv-cache-dtype before any model loads.
# fp8_e4m3 is vLLM's name for fp8; vLLM's fp8_e5m2 is left out (no kernel), so the error lists e4m3 only.
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3"]
QuantizeLmHead = Annotated[  # serve's and generate's option
    bool | None,
    typer.Option(
        "--quantize-lm-head/--no-quantize-lm-head",
        help="Quantize the LM head too. Default: the method's (int8 yes; int4, fp8 no).",
    ),
]


def serve(
    model: Annotated[
        Path | None, typer.Argument(help="Hugging Face model folder. Default: the embedded demo model.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (HTTP and gRPC).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0: any free port).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: any free port, -1: no gRPC).")] = 50051,
    served_model_name: Annotated[
        str | None, typer.Option(help="Name clients send as 'model'. Default: the folder's name, or 'demo'.")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer KEY' on the API.", envvar="TOKENMILL_API_KEY"),
    ] = None,
    vllm_metrics: Annotated[
        bool, typer.Option(help="Also export metrics under vLLM's names (vllm:...), for its routers.")
    ] = False,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests get to finish after SIGTERM.")
    ] = 30.0,
    worker_id: Annotated[
        str | None, typer.Option(help="Stable id sent as x-tokenmill-worker. Default: host:port.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_model_len: MaxModelLen = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most requests running at once.")] = 256,
    max_num_batched_tokens: Annotated[
        int | None, typer.Option(help="Token budget per step. Default: max(2048, max_model_len).")
    ] = None,
    max_waiting_requests: Annotated[
        int | None, typer.Option(help="Past this many waiting requests, answer 429. Default: unbounded.")
    ] = None,
    kv_cache_memory: KVCacheMemory = None,
    block_size: BlockSize = 16,
    enable_prefix_caching: Annotated[bool, typer.Option(help="Reuse KV of shared prompt prefixes.")] = True,
    scheduling_policy: Annotated[str, typer.Option(help="priority or fcfs.")] = "priority",
    max_itl: Annotated[
        float | None, typer.Option(help="Inter-token latency target in seconds (chunks prefills to keep it).")
    ] = None,
    timing_profile: Annotated[
        Path | None, typer.Option(help="Step-time profile from `tokenmill profile` (for --max-itl).")
    ] = None,
    kv_events: Annotated[bool, typer.Option(help="Publish KV events at /v1/kv_events.")] = True,
    runner: Annotated[
        str, typer.Option(help="model, or simulated: step times from --timing-profile, no weights run.")
    ] = "model",
    seed: Annotated[int, typer.Option(help="Seed of unseeded sampling.")] = 0,
    quantization: Annotated[
        str | None, typer.Option(help="int8, int4 or fp8: weights quantized at load. Default: none.")
    ] = None,
    quantize_lm_head: QuantizeLmHead = None,
    kv_cache_dtype: Annotated[
        KVCacheDtype,
        typer.Option(
            help="auto (the model's dtype) or fp8 (vLLM's fp8_e4m3 too): K, V in float8 e4m3 with scales "
            "(~2x tokens). e5m2 is not supported."
        ),
    ] = "auto",
    attention_backend: AttentionBackend = "auto",
    preemption_priority_gap: Annotated[
        int, typer.Option(help="A waiting request preempts running ones at least this many levels below it.")
    ] = 1,
    kv_watermark: Annotated[
        float, typer.Option(help="Share of KV blocks admission leaves free, in [0, 0.5).")
    ] = 0.01,
) -> None:
    """Serve a model over OpenAI-compatible HTTP (with SSE) and gRPC, with Prometheus metrics.

    Example: tokenmill serve --port 8000, then
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json'
    -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}'
    """
    for option, value, least in (("--port", port, 0), ("--grpc-port", grpc_port, -1)):
        # Checked before the model loads, not at bind() after it; and before torch is imported (3 s).
        if not least <= value <= 65535:
            allowed = "0 to 65535 (0: any free port)" if least == 0 else "-1 to 65535 (-1: no gRPC)"
            err.print(f"[red]error:[/red] {option} must be from {allowed}, got {value}")
            raise typer.Exit(2)

    from tokenmill.engine import EngineConfig, EngineError
    from tokenmill.server.serve import ReadyInfo, ServeError, ServeOptions, build_worker
    from tokenmill.server.serve import serve as run_worker

    kv: float | int | None = kv_cache_memory  # (parsed by its option's callback)
    config = EngineConfig(
        model=str(model) if model else None,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_waiting_requests=max_waiting_requests,
        kv_cache_memory=kv,
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
        scheduling_policy=scheduling_policy,
        max_itl=max_itl,
        timing_profile=str(timing_profile) if timing_profile else None,
        kv_events=kv_events,
        seed=seed,
        runner=runner,
        quantization=quantization,
        quantize_lm_head=quantize_lm_head,
        kv_cache_dtype=kv_cache_dtype,
        attention_backend=attention_backend,
        preemption_priority_gap=preemption_priority_gap,
        kv_watermark=kv_watermark,
    )
    options = ServeOptions(
        host=host,
        port=port,
        grpc_port=None if grpc_port < 0 else grpc_port,
        served_model_name=served_model_name,
        api_key=api_key,
        vllm_metrics=vllm_metrics,
        drain_timeout=drain_timeout,
        worker_id=worker_id,
    )
    try:
        with err.status("loading model..."):
            worker = build_worker(config, options)
    except EngineError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None

    def ready(info: ReadyInfo) -> None:
        err.print(info.line(), highlight=False, soft_wrap=True)

    try:
        run_fast(run_worker(worker, options, ready))
    except ServeError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    err.print("tokenmill worker stopped", highlight=False)
