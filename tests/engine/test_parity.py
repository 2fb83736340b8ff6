"""Parity with transformers on tiny random checkpoints of every supported family.

The oracle is transformers' eager fp32 forward over the whole sequence; ours runs
paged attention with continuous batching, chunked prefill and preemption. Greedy
tokens must be identical and logits (or logprobs) equal within fp32 tolerance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tests.tiny_models import (
    ARCHITECTURES,
    build_tiny_model,
    drain,
    hf_greedy,
    hf_logits,
    hf_model,
    random_prompts,
)
from tokenmill.engine import ModelConfig, SamplingParams
from tokenmill.engine.loader import load_model
from tokenmill.engine.models.cpu_packing import packing_supported
from tokenmill.engine.scoring import prompt_logits

ATOL = 2e-4  # fp32, two layers: differences are summation order only
PROMPT_LENGTHS = (3, 17, 33, 50)  # below, across and at several 16-token block boundaries
MAX_TOKENS = 12
# step index -> prompts (by index) that arrive just before that step
ARRIVALS = {0: [0], 1: [1], 3: [2], 4: [3]}
# Each of these crosses a block boundary while decoding MAX_TOKENS tokens.
PREEMPT_LENGTHS = (10, 12, 14, 40)


def kv_bytes(folder, num_blocks: int, block_size: int) -> int:
    """kv_cache_memory that gives exactly ``num_blocks`` blocks (the null block included)."""
    return num_blocks * block_size * ModelConfig.from_pretrained(folder).kv_bytes_per_token


def run_staggered(engine, prompts, params, arrivals=ARRIVALS):
    """Add prompts between steps as ``arrivals`` says; return (final output by id, step of the first output
    by id, most requests running at once)."""
    final, first_output_step, max_running = {}, {}, 0
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i in arrivals.get(step, []):
            engine.add_request(f"p{i}", prompts[i], params)
        for out in engine.step():
            first_output_step.setdefault(out.request_id, step)
            if out.finished:
                final[out.request_id] = out
        max_running = max(max_running, engine.stats().num_running)
        step += 1
        assert step < 2000, "engine did not finish"
    return final, first_output_step, max_running


def assert_greedy_parity(folder, prompts, final):
    assert sorted(final) == [f"p{i}" for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        got = final[f"p{i}"].outputs[0].token_ids
        assert got == hf_greedy(folder, prompt, MAX_TOKENS), f"prompt {i} ({len(prompt)} tokens)"


def assert_logprobs_match(folder, prompt, completion):
    """Each sampled position's top-20 logprobs equal log_softmax of transformers' logits."""
    tokens = completion.token_ids
    ref = torch.log_softmax(hf_logits(folder, prompt + tokens), dim=-1)
    assert completion.logprobs is not None and len(completion.logprobs) == len(tokens)
    for j, lp in enumerate(completion.logprobs):
        row = ref[len(prompt) + j - 1]
        assert lp.token_id == tokens[j]
        assert lp.rank == 1  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(float(row[tokens[j]]), abs=ATOL)
        ref_top = row.topk(20)
        assert list(lp.top) == ref_top.indices.tolist()
        torch.testing.assert_close(torch.tensor(list(lp.top.values())), ref_top.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_staggered_arrivals_greedy_tokens_and_logprobs_match(arch, tiny_models, make_engine):
    folder = tiny_models[arch]
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 64, 16))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=20)
    final, first_step, max_running = run_staggered(engine, prompts, params)

    assert max_running == len(prompts), "later arrivals should join the running batch"
    assert first_step["p3"] > first_step["p0"]
    assert_greedy_parity(folder, prompts, final)
    for i, prompt in enumerate(prompts):
        assert_logprobs_match(folder, prompt, final[f"p{i}"].outputs[0])
    assert engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_logits_match_transformers(arch, tiny_models, make_engine):
    folder = tiny_models[arch]
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 16, 16), max_model_len=128)
    sequences = random_prompts((5, 16, 40), seed=2)
    for seq, ours in zip(sequences, prompt_logits(engine, sequences), strict=True):
        torch.testing.assert_close(ours, hf_logits(folder, seq), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_gives_identical_greedy_tokens(arch, tiny_models, make_engine):
    """A 7-token budget splits every prompt but the first over several steps, interleaved with decodes."""
    folder = tiny_models[arch]
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    engine = make_engine(
        folder,
        kv_cache_memory=kv_bytes(folder, 64, 8),
        block_size=8,
        max_num_batched_tokens=7,
        max_model_len=128,
    )
    final, first_step, _ = run_staggered(
        engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    # 50 prompt tokens at no more than 7 a step take at least 8 steps before the first token.
    assert first_step["p3"] - 4 >= 7
    assert_greedy_parity(folder, prompts, final)
    assert engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preemption_gives_identical_greedy_tokens(arch, tiny_models, make_engine):
    """8 blocks of 16 tokens (7 usable). Prompts of 10, 12, 14 and 40 tokens are admitted with 1 + 1 + 1 + 3
    = 6 blocks; after 12 tokens each they need 2 + 2 + 2 + 4 = 10: the newest running requests get preempted
    and recomputed."""
    folder = tiny_models[arch]
    prompts = random_prompts(PREEMPT_LENGTHS, seed=4)
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 8, 16), max_model_len=64)
    final, _, _ = run_staggered(engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert engine.stats().num_preemptions > 0
    assert sum(out.metrics.num_preemptions for out in final.values()) == engine.stats().num_preemptions
    assert_greedy_parity(folder, prompts, final)
    assert engine.kv_cache.num_used_blocks == 0


def test_chunked_prefill_with_preemption(tiny_llama, make_engine):
    prompts = random_prompts(PREEMPT_LENGTHS, seed=5)
    engine = make_engine(
        tiny_llama,
        kv_cache_memory=kv_bytes(tiny_llama, 10, 8),
        block_size=8,
        max_model_len=64,
        max_num_batched_tokens=5,
        kv_watermark=0.0,
    )
    final, _, _ = run_staggered(engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert engine.stats().num_preemptions > 0
    assert_greedy_parity(tiny_llama, prompts, final)
    assert engine.kv_cache.num_used_blocks == 0


ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALINGS))
def test_rope_scaling(rope_type, tmp_path, tokenizer_dir, make_engine):
    """Llama 3.1-style (llama3) and linear rope scaling: frequencies, tokens and logits as in transformers."""
    from tokenmill.engine.models.layers import rope_inv_freq

    folder = build_tiny_model(
        tmp_path / rope_type, "llama", tokenizer_dir, seed=7, rope_scaling=ROPE_SCALINGS[rope_type]
    )
    cfg = ModelConfig.from_pretrained(folder)
    assert cfg.rope.scaling_type == rope_type and cfg.rope.factor == ROPE_SCALINGS[rope_type]["factor"]
    ours = rope_inv_freq(cfg.head_dim, cfg.rope)
    theirs = hf_model(folder).model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(ours, theirs)
    unscaled = rope_inv_freq(cfg.head_dim, replace(cfg.rope, scaling_type="default"))
    assert not torch.allclose(ours, unscaled), "the scaling must change some frequencies"

    prompts = random_prompts((9, 60), seed=8)  # the long one runs past original_max_position_embeddings
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 16, 16), max_model_len=128)
    final, _, _ = run_staggered(
        engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), arrivals={0: [0], 2: [1]}
    )
    assert_greedy_parity(folder, prompts, final)
    torch.testing.assert_close(
        prompt_logits(engine, prompts)[1], hf_logits(folder, prompts[1]), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_checkpoint_runs_in_bf16(tmp_path, tokenizer_dir, make_engine, arch):
    """dtype auto takes the checkpoint's bf16; prefill logits match transformers' bf16 forward to bf16
    precision (greedy decoding in bf16 may legitimately part ways on near ties, so it is not compared).
    On CPU the layers run oneDNN-packed, and a tied model's (qwen3) logits a packed embedding copy,
    which the capacity plan counts."""
    folder = build_tiny_model(tmp_path / "bf16", arch, tokenizer_dir, seed=3, dtype=torch.bfloat16)
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 16, 16), max_model_len=128)
    assert engine.dtype == torch.bfloat16
    tied = engine.model.lm_head is None
    assert tied == (arch == "qwen3")
    if packing_supported(engine.dtype, engine.device):
        assert (engine.model.packed_logits is not None) == tied
        fresh = load_model(ModelConfig.from_pretrained(folder), torch.bfloat16, torch.device("cpu"))
        plain = sum(t.numel() * t.element_size() for t in fresh.parameters())
        embed = fresh.embed_tokens.weight
        assert engine.kv_plan.weight_bytes == plain + (embed.numel() * embed.element_size() if tied else 0)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    sequences = random_prompts((7, 30), seed=12)
    for seq, ours in zip(sequences, prompt_logits(engine, sequences), strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), ref.float(), atol=3e-2, rtol=0)
    engine.add_request("r", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(drain(engine)["r"].outputs[0].token_ids) == 4


def test_mistral_sliding_window(tmp_path, tokenizer_dir, make_engine):
    """A window of 8 tokens, far shorter than the sequences, in prefill and in decode."""
    folder = build_tiny_model(tmp_path / "mistral_sw", "mistral", tokenizer_dir, seed=9)
    cfg_file = folder / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "sliding_window": 8}))
    assert ModelConfig.from_pretrained(folder).sliding_window == 8
    prompts = random_prompts((5, 30), seed=10)
    engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 16, 16), max_model_len=128)
    final, _, _ = run_staggered(
        engine, prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), arrivals={0: [0], 2: [1]}
    )
    assert_greedy_parity(folder, prompts, final)


def test_sharded_checkpoint_loads(tmp_path, tiny_llama, make_engine):
    sharded = tmp_path / "sharded"
    hf_model(tiny_llama).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, sharded / f)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()

    prompts = random_prompts((6, 20), seed=11)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    results = []
    for folder in (tiny_llama, sharded):
        engine = make_engine(folder, kv_cache_memory=kv_bytes(folder, 16, 16), max_model_len=128)
        for i, p in enumerate(prompts):
            engine.add_request(f"p{i}", p, params)
        results.append({rid: out.outputs[0].token_ids for rid, out in drain(engine).items()})
    assert results[0] == results[1]
    assert results[1]["p0"] == hf_greedy(tiny_llama, prompts[0], MAX_TOKENS)
