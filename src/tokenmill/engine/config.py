"""Model and engine configuration.

``ModelConfig`` reads a Hugging Face ``config.json`` in both the transformers 4.x
spelling (``torch_dtype``, top-level ``rope_theta``/``rope_scaling``) and the 5.x
one (``dtype``, nested ``rope_parameters``). ``EngineConfig`` holds what the
user chooses; every field has a default that works.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from tokenmill.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

# What the KV cache stores: auto, the model's (compute) dtype; fp8, float8 e4m3 with scales
# (attention/kv_cache.py). fp8_e4m3 is vLLM's name for the same; validate() turns it into fp8, so the
# rest of the engine knows one name. vLLM's fp8_e5m2 has no kernel here, and is refused by name.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling_type: str = "default"  # default | linear | llama3 | dynamic
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, as the engine needs it."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    dtype: torch.dtype
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    path: Path | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None = None) -> ModelConfig:
        """Raises UnsupportedArchitectureError for an architecture no model implements, before any
        field is read: another family names its fields otherwise (GPT-2's n_embd), and "lacks the
        field 'hidden_size'" would hide that the model itself is what is refused."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type", "")
        architecture = archs[0] if archs else model_type
        check_architecture(architecture)
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            cfg = cls(
                architecture=architecture,
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_rope_config(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=_config_dtype(raw),
                attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
                sliding_window=_sliding_window(raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_tuple(raw.get("eos_token_id")),
                path=path,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json at {path} lacks the field {e.args[0]!r}") from e
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        folder = Path(path)
        file = folder / "config.json"
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {str(folder)!r} does not exist")
        if not file.is_file():
            raise ModelLoadError(f"model folder {str(folder)!r} has no config.json")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(raw, folder)


def check_architecture(architecture: str) -> None:
    """Raises UnsupportedArchitectureError, listing the supported ones, unless a model implements
    ``architecture`` (config.json's ``architectures[0]``)."""
    # Imported here: the models import this module.
    from tokenmill.engine.models import MODEL_REGISTRY

    if architecture not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported: supported are "
            + ", ".join(sorted(MODEL_REGISTRY))
        )


def _config_dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # 5.x nests everything under rope_parameters; 4.x has rope_theta and rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    return RopeConfig(
        theta=float(theta),
        scaling_type=str(kind),
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=merged.get("original_max_position_embeddings"),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if raw.get("model_type") in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)


def _int(x: object) -> bool:
    # A bool is an int to Python; as a count or a size it is a mistake, never what was meant.
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _int(x) or (isinstance(x, float) and math.isfinite(x))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES and name != "auto":
        raise InvalidRequestError("dtype", name, "one of auto, bfloat16, float16, float32")
    return DTYPES.get(name, torch.float32)


@dataclass
class EngineConfig:
    """What the user chooses when starting an engine.

    ``kv_cache_memory`` is bytes for the KV pool, or a fraction (0, 1] of the
    device memory left free after the weights load (on CPU, of MemAvailable). ``None`` means
    0.9 of free memory on GPU and 1 GiB on CPU.
    """

    model: str | None = None  # folder in Hugging Face format; None: the embedded demo model
    dtype: str = "auto"  # auto takes the checkpoint's dtype
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # per-step token budget; None: max(2048, max_model_len)
    block_size: int = 16
    kv_cache_memory: float | int | None = None
    attention_backend: str = "auto"
    seed: int = 0
    # Scheduling (see scheduler.py and preemption.py).
    enable_prefix_caching: bool = True
    scheduling_policy: str = "priority"  # priority | fcfs
    preemption_priority_gap: int = 1  # a waiting request preempts running ones at least this far below it
    kv_watermark: float = 0.01  # fraction of KV blocks that admission leaves free
    max_waiting_requests: int | None = None  # past it, add_request raises EngineOverloadedError
    max_itl: float | None = None  # seconds: chunk prefills so running decodes keep this inter-token latency
    # A SimulatedRunner instead of the model: step times from a timing profile.
    runner: str = "model"  # model | simulated
    timing_profile: str | None = None  # JSON from `tokenmill profile`; None: the shipped default
    kv_events: bool = False  # record BlockStored/BlockRemoved/AllCleared for KV-aware routing
    quantization: str | None = None  # int8 (per row), int4 (per group) or fp8, at load: quantization.py
    # Whether the LM head is quantized too; None: the method's default (int8: yes; int4, fp8: no).
    quantize_lm_head: bool | None = None
    # auto: the model's dtype; fp8 (or vLLM's fp8_e4m3): e4m3 with a scale per slot and KV head.
    kv_cache_dtype: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (
                "max_num_seqs",
                self.max_num_seqs,
                _int(self.max_num_seqs) and self.max_num_seqs >= 1,
                "an integer >= 1",
            ),
            (
                "block_size",
                self.block_size,
                _int(self.block_size) and self.block_size in (8, 16, 32, 64, 128),
                "one of 8, 16, 32, 64, 128",
            ),
            (
                "max_model_len",
                self.max_model_len,
                self.max_model_len is None
                or (isinstance(self.max_model_len, int) and self.max_model_len >= 2),
                "an integer >= 2 or None",
            ),
            (
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                self.max_num_batched_tokens is None
                or (_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1),
                "an integer >= 1 or None",
            ),
            (
                "kv_cache_memory",
                self.kv_cache_memory,
                self.kv_cache_memory is None
                or (isinstance(self.kv_cache_memory, float) and 0 < self.kv_cache_memory <= 1)
                or (isinstance(self.kv_cache_memory, int) and self.kv_cache_memory > 1),
                "bytes (an integer > 1), a fraction in (0, 1], or None",
            ),
            (
                "quantization",
                self.quantization,
                self.quantization in (None, "int8", "int4", "fp8"),
                "int8, int4, fp8, or None for the checkpoint's weights as they are",
            ),
            (
                "quantize_lm_head",
                self.quantize_lm_head,
                self.quantize_lm_head is None or isinstance(self.quantize_lm_head, bool),
                "true, false, or None for the quantization method's default",
            ),
            (
                "kv_cache_dtype",
                self.kv_cache_dtype,
                self.kv_cache_dtype in KV_CACHE_DTYPES,
                ", ".join(KV_CACHE_DTYPES),
            ),
            (
                "scheduling_policy",
                self.scheduling_policy,
                self.scheduling_policy in ("priority", "fcfs"),
                "priority or fcfs",
            ),
            (
                "preemption_priority_gap",
                self.preemption_priority_gap,
                isinstance(self.preemption_priority_gap, int) and self.preemption_priority_gap >= 1,
                "an integer >= 1",
            ),
            (
                "kv_watermark",
                self.kv_watermark,
                isinstance(self.kv_watermark, int | float) and 0 <= self.kv_watermark < 0.5,
                "a fraction in [0, 0.5)",
            ),
            (
                "max_waiting_requests",
                self.max_waiting_requests,
                self.max_waiting_requests is None
                or (isinstance(self.max_waiting_requests, int) and self.max_waiting_requests >= 0),
                "an integer >= 0 or None",
            ),
            (
                "max_itl",
                self.max_itl,
                self.max_itl is None or (_finite(self.max_itl) and self.max_itl > 0),
                "a finite number of seconds > 0, or None",
            ),
            ("runner", self.runner, self.runner in ("model", "simulated"), "model or simulated"),
            (
                "model",
                self.model,
                self.model is None or (isinstance(self.model, str | PathLike) and str(self.model) != ""),
                "a model folder (a non-empty path), or None for the embedded demo model",
            ),
            (
                "device",
                self.device,
                isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None,
                "auto, cpu, cuda or cuda:N",
            ),
            (
                "enable_prefix_caching",
                self.enable_prefix_caching,
                isinstance(self.enable_prefix_caching, bool),
                "true or false",
            ),
            ("kv_events", self.kv_events, isinstance(self.kv_events, bool), "true or false"),
            (
                "timing_profile",
                self.timing_profile,
                # Checked here: the engine reads it only for max_itl or the simulated runner, and a
                # misspelt path must not pass unnoticed until one of those is turned on.
                self.timing_profile is None
                or (isinstance(self.timing_profile, str | PathLike) and Path(self.timing_profile).is_file()),
                "an existing JSON file written by `tokenmill profile`, or None",
            ),
            (
                "seed",
                self.seed,
                isinstance(self.seed, int)
                and not isinstance(self.seed, bool)
                and -(2**63) <= self.seed < 2**64,
                "an integer from -2^63 to 2^64-1 (what a torch generator takes)",
            ),
        ]
        if self.kv_cache_dtype == "fp8_e5m2":
            raise InvalidRequestError(
                "kv_cache_dtype",
                self.kv_cache_dtype,
                ", ".join(KV_CACHE_DTYPES),
                message="kv_cache_dtype='fp8_e5m2' is not supported: the fp8 KV cache stores float8 e4m3 "
                "only (fp8, or vLLM's fp8_e4m3)",
            )
        for name, value, ok, allowed in checks:
            if not ok:
                raise InvalidRequestError(name, value, allowed)
        self.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
