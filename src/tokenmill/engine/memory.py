"""How many KV blocks fit, and therefore how many sequences can run at once.

The pool gets what ``kv_cache_memory`` grants: a byte count, or a fraction of
the memory left after the weights load (free GPU memory, or MemAvailable on
CPU). The plan is reported at start-up so operators see the concurrency limit
the weights leave them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.attention.kv_cache import FP8_DTYPE, SCALE_DTYPE
from tokenmill.engine.config import ModelConfig
from tokenmill.engine.errors import InsufficientKVCacheError, InvalidRequestError

DEFAULT_CPU_KV_BYTES = 1 << 30
DEFAULT_GPU_FRACTION = 0.9
GiB = float(1 << 30)


@dataclass(frozen=True)
class KVCachePlan:
    """The KV pool and the concurrency it allows."""

    block_size: int
    num_blocks: int  # including the null block
    bytes_per_block: int
    max_model_len: int
    weight_bytes: int
    kv_dtype: str  # what K and V are stored as: "bfloat16", "float8_e4m3fn + float32 scales", ...

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the pool holds across all requests."""
        return self.num_usable_blocks * self.block_size

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def max_full_length_sequences(self) -> int:
        """Sequences of max_model_len tokens that fit at once: the worst-case concurrency."""
        return self.num_usable_blocks // self.blocks_per_sequence

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def summary(self) -> str:
        return (
            f"weights {self.weight_bytes / GiB:.2f} GiB; KV cache {self.kv_bytes / GiB:.2f} GiB "
            f"in {self.kv_dtype} = "
            f"{self.num_usable_blocks} blocks of {self.block_size} tokens = {self.num_tokens} tokens, "
            f"{self.max_full_length_sequences} sequences of max_model_len={self.max_model_len}"
        )


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool on the device, after the weights are loaded."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return DEFAULT_CPU_KV_BYTES


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V that one token occupies across all layers, as the cache stores them:
    ``dtype`` elements for ``auto``; for ``fp8``, one byte an element plus a float32 scale
    per KV head (attention/kv_cache.py)."""
    if kv_cache_dtype == "fp8":
        per_head = model_config.head_dim * _element_size(FP8_DTYPE) + _element_size(SCALE_DTYPE)
    else:
        per_head = model_config.head_dim * _element_size(dtype)
    return 2 * model_config.num_layers * model_config.num_kv_heads * per_head


def kv_dtype_name(dtype: torch.dtype, kv_cache_dtype: str = "auto") -> str:
    """How the start-up summary names what the cache stores."""
    if kv_cache_dtype == "fp8":
        return f"{_dtype_name(FP8_DTYPE)} + {_dtype_name(SCALE_DTYPE)} scales"
    return _dtype_name(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_kv_cache(
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_model_len: int,
    kv_cache_memory: float | int | None,
    weight_bytes: int,
    kv_cache_dtype: str = "auto",
) -> KVCachePlan:
    """Size the pool; raise InsufficientKVCacheError when not one full sequence fits."""
    bytes_per_block = kv_bytes_per_token(model_config, dtype, kv_cache_dtype) * block_size
    if kv_cache_memory is None:
        budget = (
            int(available_memory(device) * DEFAULT_GPU_FRACTION)
            if device.type == "cuda"
            else DEFAULT_CPU_KV_BYTES
        )
    elif isinstance(kv_cache_memory, float):
        budget = int(available_memory(device) * kv_cache_memory)
    else:
        budget = int(kv_cache_memory)
    plan = KVCachePlan(
        block_size=block_size,
        num_blocks=max(budget // bytes_per_block, 0),
        bytes_per_block=bytes_per_block,
        max_model_len=max_model_len,
        weight_bytes=weight_bytes,
        kv_dtype=kv_dtype_name(dtype, kv_cache_dtype),
    )
    if plan.num_blocks < 2 or plan.max_full_length_sequences < 1:
        need = (plan.blocks_per_sequence + 1) * bytes_per_block
        usable = max(plan.num_usable_blocks, 0)
        shorter = f" or lower max_model_len to at most {usable * block_size}" if usable else ""
        raise InsufficientKVCacheError(
            f"the KV cache gets {budget / GiB:.3f} GiB = {usable} blocks of "
            f"{block_size} tokens ({bytes_per_block} bytes each), but one sequence of "
            f"max_model_len={max_model_len} needs {plan.blocks_per_sequence} blocks "
            f"({need / GiB:.3f} GiB with the null block): raise kv_cache_memory to at least "
            f"{need} bytes{shorter}"
        )
    return plan


def check_pool_fits(kv_cache_memory: float | int | None, plan: KVCachePlan, device: torch.device) -> None:
    """A pool given in bytes must fit in what the device has free after the weights. On CPU the
    allocation would succeed (memory is overcommitted) and zeroing it touch every page, so the
    kernel would kill this process, or a neighbour, instead of the user getting an error."""
    if not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool):
        return  # a fraction of what is free, or the default: fits by construction
    pool = plan.num_blocks * plan.bytes_per_block
    free = available_memory(device)
    if pool > free:
        raise InvalidRequestError(
            "kv_cache_memory",
            kv_cache_memory,
            f"at most {free} bytes ({free / 2**30:.2f} GiB free on {device} after the weights), or a "
            "fraction in (0, 1] of what is free",
        )
