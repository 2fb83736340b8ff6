"""The CPU backend: its paged decode kernel against attention written out by hand (any shape, any
dtype), mixed steps against the reference backend, and bad arguments refused before the cache is touched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.attention.test_reference import BS, D, naive, paged_step
from tokenmill.engine import native
from tokenmill.engine.attention import CpuBackend, ReferenceBackend, get_backend
from tokenmill.engine.attention.backend import AttentionSpec
from tokenmill.engine.errors import InvalidRequestError

CPU = torch.device("cpu")
REASON = native.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"no native kernels here: {REASON}")


def spec(heads: int, kv_heads: int, dtype: torch.dtype = torch.float32, **kw) -> AttentionSpec:
    return AttentionSpec(heads, kv_heads, D, BS, dtype, CPU, **kw)


@needs_kernels
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("H", "KVH"), [(4, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize(
    ("shapes", "num_decodes"),
    [
        ([(6, 1), (9, 1), (0, 1), (13, 1)], 4),  # decodes only: one kernel call is the layer's attention
        ([(6, 1), (9, 1), (5, 3), (5, 3), (0, 4), (2, 7)], 2),  # decodes beside prefills of every kind
        ([(0, 4), (3, 2)], 0),  # prefills only
    ],
)
def test_steps_match_naive_attention(window, H, KVH, shapes, num_decodes):
    torch.manual_seed(0)
    backend = CpuBackend(spec(H, KVH, sliding_window=window))
    step = paged_step(backend, shapes, num_decodes)
    out = step.run(backend)
    for i, (ctx, _) in enumerate(shapes):
        want = naive(step.queries[i], step.keys[i], step.values[i], ctx, window)
        torch.testing.assert_close(
            out[step.qsl[i] : step.qsl[i + 1]], want, atol=1e-5, rtol=1e-5, msg=f"request {i}"
        )
    # The same step on the reference backend stores the same bytes.
    torch.manual_seed(0)
    reference = ReferenceBackend(backend.spec)
    same = paged_step(reference, shapes, num_decodes)
    torch.testing.assert_close(same.run(reference), out, atol=1e-5, rtol=1e-5)
    assert torch.equal(same.cache, step.cache)


def reference_decode(q, cache, tables, lens, block_size, window):
    """float64 attention of each row of q over its context, read through the block table."""
    n, heads, dim = q.shape
    kv_heads = cache.shape[2]
    out = torch.empty(n, heads, dim, dtype=torch.float64)
    for i in range(n):
        pos = torch.arange(int(lens[i]))
        if window:
            pos = pos[pos >= int(lens[i]) - window]
        slots = tables[i][pos // block_size] * block_size + pos % block_size
        keys = cache[0][slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        values = cache[1][slots].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].double(), keys) * dim**-0.5
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
    return out


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    dim=st.sampled_from([1, 5, 8, 20, 64, 80]),  # shorter than, equal to and past a vector, with tails
    block_size=st.sampled_from([1, 4, 16]),
    window=st.sampled_from([0, 1, 9]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    spread=st.sampled_from([1.0, 40.0]),  # 40: scores hundreds apart, past where e^x leaves float32
    seed=st.integers(0, 2**16),
)
def test_the_kernel_is_attention_over_the_blocks(
    lens, kv_heads, group, dim, block_size, window, dtype, spread, seed
):
    gen = torch.Generator().manual_seed(seed)
    n, heads = len(lens), kv_heads * group
    max_blocks = -(-max(lens) // block_size) + 1  # a spare column: padding the kernel must not read
    num_blocks = 1 + n * max_blocks
    cache = torch.randn(2, num_blocks * block_size, kv_heads, dim, generator=gen).to(dtype)
    tables = (1 + torch.randperm(n * max_blocks, generator=gen)).view(n, max_blocks)
    lens_t = torch.tensor(lens)
    last = lens_t - 1
    slots = tables[torch.arange(n), last // block_size] * block_size + last % block_size
    q = (torch.randn(n, heads, dim, generator=gen) * spread).to(dtype)
    k = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    op = native.paged_decode_attention()
    out = op(q, k, v, cache, slots, tables, lens_t, block_size, dim**-0.5, window)
    assert torch.equal(cache[0][slots], k) and torch.equal(cache[1][slots], v)
    want = reference_decode(q, cache, tables, lens_t, block_size, window)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@needs_kernels
def test_strided_views_of_a_fused_product_are_read_in_place():
    """q, k and v as the model hands them: column slices of one qkv product."""
    torch.manual_seed(1)
    heads, kv_heads, dim, bs = 4, 2, 16, 4
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(3, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(3, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim)
    cache = torch.randn(2, 8 * bs, kv_heads, dim)
    tables = torch.tensor([[1, 2], [3, 4], [5, 6]])
    lens = torch.tensor([5, 1, 8])
    slots = torch.tensor([2 * bs + 0, 3 * bs + 0, 6 * bs + 3])
    op = native.paged_decode_attention()
    out = op(q, k, v, cache, slots, tables, lens, bs, dim**-0.5, 0)
    want = reference_decode(q.contiguous(), cache, tables, lens, bs, 0)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slots": torch.tensor([99])}, "slot 99 is outside"),
        ({"lens": torch.tensor([0])}, "seq_len 0 does not fit"),
        ({"lens": torch.tensor([9])}, "seq_len 9 does not fit"),
        ({"tables": torch.tensor([[1, 7]])}, "block 7 is outside"),
        ({"tables": torch.tensor([[-1, 2]])}, "block -1 is outside"),
        ({"q": torch.zeros(1, 4, 8, dtype=torch.bfloat16)}, "must share a dtype"),
        ({"q": torch.zeros(1, 3, 8)}, "a multiple of the cache's kv_heads"),
        ({"lens": torch.tensor([2], dtype=torch.int32)}, "seq_lens must be int64"),
    ],
)
def test_bad_arguments_are_refused_before_the_cache_is_written(change, message):
    bs = 4
    args = {
        "q": torch.zeros(1, 4, 8),
        "k": torch.ones(1, 2, 8),
        "v": torch.ones(1, 2, 8),
        "cache": torch.zeros(2, 3 * bs, 2, 8),
        "slots": torch.tensor([5]),
        "tables": torch.tensor([[1, 2]]),
        "lens": torch.tensor([6]),
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        native.paged_decode_attention()(*args.values(), bs, 0.5, 0)
    assert not args["cache"].any()


def test_auto_picks_the_kernel_where_it_serves_the_spec():
    plain, fp8 = spec(4, 2, torch.bfloat16), spec(4, 2, torch.bfloat16, kv_cache_dtype="fp8")
    assert isinstance(get_backend("auto", fp8), ReferenceBackend)
    assert isinstance(get_backend("reference", plain), ReferenceBackend)
    if REASON is None:
        assert isinstance(get_backend("auto", plain), CpuBackend)
    else:
        assert isinstance(get_backend("auto", plain), ReferenceBackend)


def test_asking_for_the_kernel_where_it_cannot_run_names_the_field_and_the_way_out():
    with pytest.raises(InvalidRequestError, match=r"attention_backend='cpu' cannot run here: .*fp8") as e:
        get_backend("cpu", spec(4, 2, kv_cache_dtype="fp8"))
    assert e.value.field == "attention_backend" and "reference" in e.value.allowed
