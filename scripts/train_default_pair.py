"""Train the default pair that ships with the package: a tiny Gemma 4 code model and its MTP drafter.

Everything comes from this machine's Python standard library sources (no download):

1. ``tokenizer``: a SentencePiece BPE tokenizer (4,096 pieces, byte fallback, Gemma's
   special ids), shipped both as ``tokenizer.model`` and as the Hugging Face
   ``tokenizer.json`` that mlx-lm loads. Training data is tokenized with the latter, so
   training and inference split text identically.
2. ``target``: a 20-layer, 128-wide Gemma 4 text model (transformers'
   ``Gemma4ForCausalLM``): sliding and full attention layers with a full last layer,
   the last 8 layers KV-shared, logit softcap 30. Trained with next-token cross-entropy.
3. ``drafter``: a 2-layer ``gemma4_assistant`` with a centroid head, trained by this
   package's MLX trainer (``gemma_mtp_mlx.train.trainer``, the code behind ``gemma-mtp
   train-drafter``) like Google's drafters: from the frozen target's final-norm hidden
   states and its shared K/V, unrolled for ``draft_steps`` steps at the fixed position P, to
   match the target's next-token distribution and its probability mass per centroid.
   Tokens are grouped into centroids by a balanced k-means over the target's embeddings.
4. ``install``: both checkpoints into the package (a temporary directory, then renamed).
5. ``evaluate``: held-out greedy mean accepted length at k=4 through this package's MLX
   runtime; writes the held-out prompts the benchmark uses by default.

Every stage is deterministic given ``SETTINGS["seed"]`` (fixed data order, seeded
initialisation, 2 torch threads); its settings, the corpus digest, losses and timings are recorded in
``training.json`` next to the checkpoints. ``--stage all`` runs every stage (about
55 minutes on an idle 2-core CPU) and writes the result into ``gemma_mtp_mlx/models/``.

Usage: python scripts/train_default_pair.py [--stage all|tokenizer|target|drafter|install|evaluate]
(on Linux with ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0``:
the drafter stage runs on MLX, whose bundled CPU BLAS is a slow reference one).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tokenizers import processors
from tokenizers.models import BPE
from transformers import (
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    GemmaTokenizer,
    GenerationConfig,
)
from transformers.convert_slow_tokenizer import SentencePieceExtractor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402  (a sibling script, not a package)
    FULL,
    ROPE_PARAMETERS,
    SLIDING,
    save_model,
)

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "gemma_mtp_mlx" / "models"
TARGET_NAME = "gemma-4-tiny-python"
DRAFTER_NAME = "gemma-4-tiny-python-assistant"

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

SETTINGS = {
    "seed": 0,
    "torch_threads": 2,
    "corpus": {
        "source": "Python standard library sources (*.py), without test packages",
        "held_out_every": 20,  # every 20th file (sorted by path) is held out
        "held_out_offset": 7,
    },
    "tokenizer": {
        "model_type": "bpe",
        "vocab_size": 4096,
        "byte_fallback": True,
        "split_digits": True,
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "user_defined_symbols": ["\n"],
        "chunk_chars": 4000,
    },
    "target": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 20,
        "full_attention_every": 5,  # layers 4, 9, 14, 19 are full attention (the last is)
        "num_kv_shared_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "sliding_window": 128,
        "final_logit_softcapping": 30.0,
        "seq_len": 256,
        "batch_size": 16,
        "steps": 560,
        "lr": 2e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 50,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
    },
    "drafter": {  # gemma_mtp_mlx.train.trainer.Settings (Adam, betas 0.9 / 0.95, k-means 25 iterations)
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_layers": 2,  # [sliding, full]
        "num_heads": 4,
        "num_centroids": 128,
        "centroid_top_k": 8,
        "draft_steps": 4,
        "num_assistant_tokens": 4,
        "seq_len": 256,
        "batch_size": 16,
        "steps": 800,
        "learning_rate": 2e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 30,
        "grad_clip": 1.0,
        "centroid_loss_weight": 1.0,
        "eval_every": 200,  # held-out mean accepted length at k=4, through the MLX runtime
        "eval_prompts": 8,
        "eval_prompt_tokens": 64,
        "eval_max_tokens": 64,
        "eval_draft_tokens": 4,
    },
    "evaluate": {"prompts": 24, "prompt_tokens": 64, "max_tokens": 128, "num_draft_tokens": 4},
}


def special_ids() -> dict:
    return dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


# ---------------------------------------------------------------------------
# Corpus


def corpus_files() -> tuple[list[Path], list[Path], Path]:
    """(training files, held-out files, stdlib root), both lists sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in skip or part.startswith("test_") for part in p.relative_to(root).parts)
    )
    every, offset = SETTINGS["corpus"]["held_out_every"], SETTINGS["corpus"]["held_out_offset"]
    held_out = [p for i, p in enumerate(files) if i % every == offset]
    train = [p for i, p in enumerate(files) if i % every != offset]
    return train, held_out, root


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def corpus_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Stage 1: tokenizer


def train_tokenizer(work: Path, log: dict) -> None:
    settings = SETTINGS["tokenizer"]
    train, held_out, root = corpus_files()
    size = settings["chunk_chars"]
    texts = [read_source(p) for p in train]
    chunks = [text[i : i + size] for text in texts for i in range(0, len(text), size)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        **{key: value for key, value in settings.items() if key != "chunk_chars"},
        normalization_rule_name="identity",
        character_coverage=1.0,
        max_sentence_length=4 * size,
        num_threads=SETTINGS["torch_threads"],
        minloglevel=2,
    )
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.model").write_bytes(model.getvalue())
    hf = hf_tokenizer(tokenizer_dir / "tokenizer.model")
    hf.save_pretrained(tokenizer_dir)

    # The Hugging Face tokenizer must split text exactly as SentencePiece does.
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    mismatches = sum(
        sp.encode(text) != hf(text, add_special_tokens=False).input_ids for text in map(read_source, held_out)
    )
    log["tokenizer"] = {
        "python": platform.python_version(),
        "stdlib": str(root),
        "train_files": len(train),
        "held_out_files": [str(p.relative_to(root)) for p in held_out],
        "train_digest": corpus_digest(train),
        "train_chars": sum(map(len, texts)),
        "held_out_files_tokenized_differently_by_hf": mismatches,
    }
    if mismatches:
        raise RuntimeError(f"tokenizer.json splits {mismatches} held-out files differently from SentencePiece")


def hf_tokenizer(model_file: Path) -> GemmaTokenizer:
    """The Hugging Face (tokenizers) form of the SentencePiece model, adding <bos> like Gemma's."""
    extracted = SentencePieceExtractor(str(model_file)).extract(BPE)
    tokenizer = GemmaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        additional_special_tokens=extracted["additional_special_tokens"],
    )
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tokenizer


def load_tokens(work: Path, files: list[Path]) -> np.ndarray:
    """Every file tokenized and concatenated, each followed by <eos>: one int32 stream."""
    tokenizer = GemmaTokenizer.from_pretrained(work / "tokenizer")
    stream = []
    for text in map(read_source, files):
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        stream.append(EOS_ID)
    return np.asarray(stream, dtype=np.int32)


# ---------------------------------------------------------------------------
# Shared training pieces


def batches(stream: np.ndarray, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless batches of `<bos>` + `seq_len` tokens from random offsets of the stream."""
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator).numpy()
        rows = np.stack([stream[s : s + seq_len] for s in starts])
        bos = np.full((batch_size, 1), BOS_ID, dtype=np.int32)
        yield torch.from_numpy(np.concatenate([bos, rows], axis=1)).long()


def learning_rate(step: int, settings: dict) -> float:
    warmup, total, peak = settings["warmup_steps"], settings["steps"], settings["lr"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = settings["min_lr_ratio"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer(model: torch.nn.Module, settings: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
    )


def train_loop(name: str, model, settings: dict, stream: np.ndarray, loss_fn, log: dict) -> None:
    opt = optimizer(model, settings)
    generator = torch.Generator().manual_seed(SETTINGS["seed"] + 1)
    data = batches(stream, settings["seq_len"], settings["batch_size"], generator)
    losses, start = [], time.time()
    for step in range(settings["steps"]):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = loss_fn(next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == settings["steps"] - 1:
            recent = float(np.mean(losses[-25:]))
            print(f"{name} step {step}/{settings['steps']} loss {recent:.3f} ({time.time() - start:.0f} s)", flush=True)
    log[name] = {
        "train_loss_first_25": float(np.mean(losses[:25])),
        "train_loss_last_25": float(np.mean(losses[-25:])),
        "train_tokens": settings["steps"] * settings["batch_size"] * settings["seq_len"],
        "seconds": round(time.time() - start, 1),
    }


# ---------------------------------------------------------------------------
# Stage 2: target


# Text-config settings both models share: no per-layer inputs, single-width MLP, no MoE,
# separate K and V, tied embeddings, transformers' Gemma 4 RoPE defaults.
COMMON_TEXT_CONFIG = dict(
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    use_double_wide_mlp=False,
    enable_moe_block=False,
    attention_k_eq_v=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_parameters=ROPE_PARAMETERS,
    vocab_size=SETTINGS["tokenizer"]["vocab_size"],
    **special_ids(),
)
# The target settings that are config fields (the rest are training settings).
TARGET_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_kv_shared_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window", "final_logit_softcapping",
)


def target_config() -> Gemma4TextConfig:
    s = SETTINGS["target"]
    every = s["full_attention_every"]
    layer_types = [FULL if i % every == every - 1 else SLIDING for i in range(s["num_hidden_layers"])]
    if layer_types[-1] != FULL:
        raise ValueError("Gemma 4's last layer is full attention")
    return Gemma4TextConfig(
        layer_types=layer_types, **{key: s[key] for key in TARGET_CONFIG_KEYS}, **COMMON_TEXT_CONFIG
    )


def train_target(work: Path, log: dict) -> None:
    torch.manual_seed(SETTINGS["seed"])
    config = target_config()
    config._attn_implementation = "sdpa"
    model = Gemma4ForCausalLM(config).train()
    train, _, _ = corpus_files()
    stream = load_tokens(work, train)
    log["target_data"] = {"train_tokens_in_corpus": int(len(stream))}

    def loss_fn(batch):
        # output_hidden_states sidesteps transformers 5.23 slicing per-layer inputs that
        # this model (without per-layer embeddings) does not have.
        return model(input_ids=batch, labels=batch, output_hidden_states=True).loss

    train_loop("target", model, SETTINGS["target"], stream, loss_fn, log)
    save_model(model.eval(), work / "target", GenerationConfig(**special_ids()))


# ---------------------------------------------------------------------------
# Stage 3: drafter


def train_drafter(work: Path, log: dict) -> None:
    """The package's own MLX trainer (`gemma-mtp train-drafter`) on the training files, evaluated
    on the held-out ones; a fresh drafter whose embedding starts from the target's."""
    sys.path.insert(0, str(REPO))
    from gemma_mtp_mlx.train import trainer

    s = SETTINGS["drafter"]
    for path in (work / "tokenizer").iterdir():  # the trainer loads the target with its tokenizer
        shutil.copy2(path, work / "target" / path.name)
    out = work / "drafter"
    shutil.rmtree(out, ignore_errors=True)
    train, held_out, _ = corpus_files()
    settings = trainer.Settings(
        model=str(work / "target"), out=str(out), data=[str(p) for p in train], eval_data=[str(p) for p in held_out],
        seed=SETTINGS["seed"] + 2, **{key: s[key] for key in DRAFTER_TRAINER_KEYS},
    )
    if s["steps"] < settings.checkpoint_every:
        settings.checkpoint_every = 0
    result = trainer.train(settings)
    log["drafter"] = {key: value for key, value in result.items() if key not in ("settings", "losses")}


# SETTINGS["drafter"] keys that are the trainer's settings of the same name
DRAFTER_TRAINER_KEYS = (
    "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_centroids", "centroid_top_k",
    "draft_steps", "num_assistant_tokens", "seq_len", "batch_size", "steps", "learning_rate", "min_lr_ratio",
    "warmup_steps", "grad_clip", "centroid_loss_weight", "eval_every", "eval_prompts", "eval_prompt_tokens",
    "eval_max_tokens", "eval_draft_tokens",
)


# ---------------------------------------------------------------------------
# Stage 4: evaluation through this package's MLX runtime


def held_out_prompts(tokenizer, count: int, length: int) -> list[str]:
    """`count` snippets of about `length` tokens, spread evenly over the held-out files,
    each starting at a line a third of the way into its file."""
    _, held_out, _ = corpus_files()
    prompts = []
    for i in range(count):
        text = read_source(held_out[i * len(held_out) // count])
        start = text.rfind("\n", 0, len(text) // 3) + 1
        ids = tokenizer.encode(text[start:], add_special_tokens=False)[:length]
        prompts.append(tokenizer.decode(ids))
    return prompts


def evaluate(out: Path, log: dict) -> None:
    """Held-out greedy mean accepted length at k=4, through this package's MLX runtime.
    Also writes the prompts to `out/prompts.jsonl`, the default benchmark prompts."""
    sys.path.insert(0, str(REPO))
    from gemma_mtp_mlx import load, stream_generate

    s = SETTINGS["evaluate"]
    model, tokenizer, drafter = load(str(out / TARGET_NAME), draft_model=str(out / DRAFTER_NAME))
    prompts = held_out_prompts(tokenizer, s["prompts"], s["prompt_tokens"])
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    rounds = accepted = 0
    for prompt in prompts:
        for response in stream_generate(
            model, tokenizer, prompt, draft_model=drafter, max_tokens=s["max_tokens"],
            num_draft_tokens=s["num_draft_tokens"],
        ):
            pass
        rounds += response.stats.rounds
        accepted += response.stats.accepted_tokens
    mean = accepted / rounds + 1
    log["evaluate"] = {"held_out_greedy_mean_accepted_length_k4": round(mean, 3), "rounds": rounds}
    print(f"held-out greedy mean accepted length (k=4): {mean:.3f}", flush=True)


# ---------------------------------------------------------------------------


def install(work: Path, out: Path, log: dict) -> None:
    """Write both checkpoints into `out` (a temporary directory renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, source in ((TARGET_NAME, work / "target"), (DRAFTER_NAME, work / "drafter")):
        temporary = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
        for path in source.iterdir():
            if path.name != "training.json":  # the trainer's log; its numbers are in ours
                shutil.copy2(path, temporary / path.name)
        if name == TARGET_NAME:
            for path in (work / "tokenizer").iterdir():
                shutil.copy2(path, temporary / path.name)
        temporary.chmod(0o755)
        for path in temporary.iterdir():
            path.chmod(0o644)
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="all", choices=["all", "tokenizer", "target", "drafter", "install", "evaluate"])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "default_pair", help="intermediate files")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="where the shipped checkpoints go")
    args = parser.parse_args()
    torch.set_num_threads(SETTINGS["torch_threads"])
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / "training.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["settings"] = SETTINGS
    log["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    stages = {
        "tokenizer": lambda: train_tokenizer(args.work, log),
        "target": lambda: train_target(args.work, log),
        "drafter": lambda: train_drafter(args.work, log),
        "install": lambda: install(args.work, args.out, log),
        "evaluate": lambda: evaluate(args.out, log),
    }
    for name in stages if args.stage == "all" else [args.stage]:
        start = time.time()
        stages[name]()
        log.setdefault("stage_seconds", {})[name] = round(time.time() - start, 1)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    if args.stage in ("all", "install", "evaluate"):
        shutil.copy2(log_path, args.out / "training.json")


if __name__ == "__main__":
    main()
