#!/usr/bin/env bash
# Fine-tune the default target on another language, watch the shipped drafter's acceptance
# drop, and win it back with `gemma-mtp train-drafter`. One command, offline:
#
#   scripts/demo_train_drafter.sh
#
# The default budget (FT_ITERS=100 fine-tuning iterations of 8 x 256 tokens, DRAFTER_STEPS=200
# drafter steps of DRAFTER_BATCH=8 x DRAFTER_SEQ_LEN=128 tokens, BENCH_REPEATS=3) runs end to
# end in under an hour on a 2-core x86 VM with MLX's CPU backend, shared with other jobs; set
# those variables for a larger one (WORK=... for a fresh directory: a fine-tuned target already
# in $WORK is reused).
#
# 1. corpus: this machine's C headers (/usr/include/**/*.h, byte-identical copies dropped);
#    every 20th file (sorted by path) is held out. Written as mlx-lm data (train.jsonl /
#    valid.jsonl of {"text": ...} chunks), held-out text and 8 held-out prompts (JSON strings,
#    the benchmark's --prompts form).
# 2. target: mlx-lm full fine-tuning of the default target (mlx_lm lora --fine-tune-type full),
#    fused into an ordinary checkpoint (mlx_lm fuse).
# 3. before: the shipped drafter on the fine-tuned target, held-out C, k=4 (bench, greedy).
# 4. train-drafter from the shipped drafter, on the C training text, evaluated on held-out C.
# 5. after: the trained drafter, same benchmark. The acceptance numbers are also in
#    $WORK/c_drafter/training.json (mean_accepted_length_before / _after, every --eval-every).
#
# On Linux, MLX's CPU backend ships a reference BLAS (~2 GFLOPS): this script preloads OpenBLAS
# when installed (apt-get install libopenblas0-pthread), ~20x faster matrix products, with one
# BLAS thread (its worker threads spin against MLX's own on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [[ "$(uname -s)" == Linux && -z "${LD_PRELOAD:-}" && -e "$OPENBLAS" ]]; then
    export LD_PRELOAD="$OPENBLAS"
fi
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-build/demo_train_drafter}
FT_ITERS=${FT_ITERS:-100}
DRAFTER_STEPS=${DRAFTER_STEPS:-200}
DRAFTER_BATCH=${DRAFTER_BATCH:-8}
DRAFTER_SEQ_LEN=${DRAFTER_SEQ_LEN:-128}
BENCH_REPEATS=${BENCH_REPEATS:-3}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TARGET=gemma_mtp_mlx/models/gemma-4-tiny-python
SHIPPED_DRAFTER=gemma_mtp_mlx/models/gemma-4-tiny-python-assistant
mkdir -p "$WORK"
stage() { echo "== $* ($SECONDS s in)" >&2; }

stage "1. C header corpus"
"$PYTHON" - "$WORK/c" <<'EOF'
import hashlib, json, sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
unique = {}  # content digest -> first path: vendored copies (node's per-arch OpenSSL) would leak held-out text
for f in sorted(Path("/usr/include").rglob("*.h")):
    unique.setdefault(hashlib.sha256(f.read_bytes()).digest(), f)
files = sorted(unique.values())
held = [f for i, f in enumerate(files) if i % 20 == 7]
train = [f for i, f in enumerate(files) if i % 20 != 7]
def text(f): return f.read_text(encoding="utf-8", errors="replace")
def line_start(t, fraction): return t.rfind("\n", 0, int(len(t) * fraction)) + 1
def chunks(fs, size=500):  # about 220 tokens, under mlx-lm's --max-seq-length 256
    for f in fs:
        t = text(f)
        yield from (t[i:i + size] for i in range(0, len(t), size))
sample = list(chunks(train))[::5]  # every 5th chunk: far more than the runs below read, quick to tokenize
with open(out / "train.jsonl", "w") as f:
    f.writelines(json.dumps({"text": c}) + "\n" for i, c in enumerate(sample) if i % 50)
with open(out / "valid.jsonl", "w") as f:  # mlx-lm's validation split: every 50th sampled chunk
    f.writelines(json.dumps({"text": c}) + "\n" for i, c in enumerate(sample) if i % 50 == 0)
with open(out / "held_out.jsonl", "w") as f:  # train-drafter's evaluation: from mid-file, past license headers
    f.writelines(json.dumps({"text": text(p)[line_start(text(p), 0.5):]}) + "\n" for p in held)
prompts = []
for p in held[:: max(1, len(held) // 8)][:8]:  # the benchmark's: a third into the file, ~400 chars
    t = text(p)
    prompts.append(t[line_start(t, 1 / 3):][:400])
(out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
print(f"{len(files)} distinct headers: {len(train)} for training ({len(sample)} chunks sampled), "
      f"{len(held)} held out", file=sys.stderr)
EOF

stage "2. fine-tune the default target on C (mlx-lm, full, $FT_ITERS iterations)"
if [[ ! -f "$WORK/c_target/config.json" ]]; then
    "$PYTHON" -m mlx_lm lora --model "$TARGET" --train --data "$WORK/c" --fine-tune-type full \
        --iters "$FT_ITERS" --batch-size 8 --max-seq-length 256 --learning-rate 1e-3 --seed 0 \
        --steps-per-eval "$FT_ITERS" --val-batches 4 --adapter-path "$WORK/c_adapter"
    "$PYTHON" -m mlx_lm fuse --model "$TARGET" --adapter-path "$WORK/c_adapter" --save-path "$WORK/c_target"
fi

bench() {  # bench NAME DRAFTER
    PYTHON="$PYTHON" bench/run.sh --model "$WORK/c_target" --draft-model "$2" --prompts "$WORK/c/prompts.jsonl" \
        --ks 4 --temps 0 --max-tokens 128 --repeats "$BENCH_REPEATS" --out "$WORK/bench_$1"
}

stage "3. the shipped drafter on the fine-tuned target, held-out C"
bench shipped "$SHIPPED_DRAFTER"

stage "4. train-drafter ($DRAFTER_STEPS steps)"
rm -rf "$WORK/c_drafter" "$WORK/c_drafter.checkpoint"
"$PYTHON" -m gemma_mtp_mlx train-drafter --model "$WORK/c_target" --draft-model "$SHIPPED_DRAFTER" \
    --data "$WORK/c/train.jsonl" --eval-data "$WORK/c/held_out.jsonl" --steps "$DRAFTER_STEPS" \
    --batch-size "$DRAFTER_BATCH" --seq-len "$DRAFTER_SEQ_LEN" --learning-rate 1e-3 \
    --eval-every $(( DRAFTER_STEPS / 4 > 0 ? DRAFTER_STEPS / 4 : 1 )) --eval-max-tokens 128 \
    -o "$WORK/c_drafter"

stage "5. the trained drafter, same benchmark"
bench trained "$WORK/c_drafter"

stage "summary: whole run"
cat "$WORK/bench_shipped/bench.md" "$WORK/bench_trained/bench.md"
"$PYTHON" -c 'import json, sys; log = json.load(open(sys.argv[1])); steps, seconds = log["steps"], log["train_seconds"]
print("train-drafter (held-out C, k=4, greedy): mean accepted length",
      log["mean_accepted_length_before"], "->", log["mean_accepted_length_after"], f"after {steps} steps in {seconds:.0f} s")' \
    "$WORK/c_drafter/training.json"
