"""``kv_cache_dtype``: vLLM's ``fp8_e4m3`` is ``fp8``; its ``fp8_e5m2`` is refused, saying e4m3 only."""

from __future__ import annotations

import pytest

from tokenmill.engine import EngineConfig, InvalidRequestError


def test_fp8_e4m3_is_fp8(tiny_llama, make_engine):
    config = EngineConfig(kv_cache_dtype="fp8_e4m3")
    config.validate()
    assert config.kv_cache_dtype == "fp8"  # the one name the rest of the engine compares with
    alias = make_engine(tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype="fp8_e4m3")
    fp8 = make_engine(tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype="fp8")
    assert alias.kv_plan == fp8.kv_plan and "float8_e4m3fn" in alias.kv_plan.summary()


def test_fp8_e5m2_is_refused_saying_e4m3_only():
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig(kv_cache_dtype="fp8_e5m2").validate()
    assert e.value.field == "kv_cache_dtype"
    assert str(e.value) == (
        "kv_cache_dtype='fp8_e5m2' is not supported: the fp8 KV cache stores float8 e4m3 only "
        "(fp8, or vLLM's fp8_e4m3)"
    )
