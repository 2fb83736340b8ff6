"""Tiny random Hugging Face checkpoints for tests, built with transformers from configs.

The tokenizer is a byte-level BPE trained in a fraction of a second on Python's
own documentation text (``pydoc_data.topics``), so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB_SIZE = 512
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


def build_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([training_text()], trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A",
        pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B",
        special_tokens=[(SPECIALS[0], bos)],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIALS[0],
                "eos_token": SPECIALS[1],
                "model_max_length": 512,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return out


def tiny_config(arch: str, vocab_size: int, bos: int, eos: int, **overrides):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=bos,
        eos_token_id=eos,
        rms_norm_eps=1e-6,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    raise ValueError(arch)


def build_tiny_model(
    out: Path, arch: str, tokenizer_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    import transformers

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    cfg = tiny_config(arch, VOCAB_SIZE, ids[SPECIALS[0]], ids[SPECIALS[1]], **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init is too flat for greedy parity to mean much: widen the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


# -- references and drivers shared by the engine tests ------------------------------------------------


def random_prompts(lengths, seed: int = 0, vocab_size: int = VOCAB_SIZE, low: int = len(SPECIALS)):
    """Token-id prompts of the given lengths, free of special tokens, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]


_HF_MODELS: dict[str, object] = {}


def hf_model(folder: Path):
    """The transformers model of a checkpoint folder, loaded once per folder, eager fp32."""
    import transformers

    key = str(folder)
    if key not in _HF_MODELS:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        _HF_MODELS[key] = model.eval()
    return _HF_MODELS[key]


@torch.no_grad()
def hf_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits for every position of one sequence: [len(token_ids), vocab], fp32."""
    model = hf_model(folder)
    return model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(folder: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation (no EOS stop), recomputing the whole sequence each step."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(hf_logits(folder, ids)[-1].argmax()))
    return ids[len(prompt) :]


def drain(engine, max_steps: int = 10_000) -> dict:
    """Step until idle; return the last output of every request, by request id."""
    last = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return last
        for out in engine.step():
            last[out.request_id] = out
    raise AssertionError(f"engine still busy after {max_steps} steps")
