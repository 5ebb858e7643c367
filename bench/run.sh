#!/usr/bin/env bash
# Run `gemma-mtp bench` with the BLAS that makes CPU numbers meaningful; see bench/README.md.
#
#   bench/run.sh --model PAIR_DIR [--draft-model DRAFTER] [any other `gemma-mtp bench` option]
#
# On Linux, MLX's CPU backend ships a reference BLAS (~3 GFLOPS sgemm) under which every
# (k+1)-token verify costs (k+1)x a decode step, so speculation cannot pay. This script
# preloads OpenBLAS when it is installed (apt-get install libopenblas0-pthread) and warns
# when it is not. Run it from the repository root: results go to bench/results/ unless
# --out says otherwise.
set -euo pipefail

OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [[ "$(uname -s)" == Linux && -z "${LD_PRELOAD:-}" ]]; then
    if [[ -e "$OPENBLAS" ]]; then
        export LD_PRELOAD="$OPENBLAS"
    else
        echo "bench/run.sh: $OPENBLAS not found; CPU results will use MLX's reference BLAS." >&2
        echo "  install it with: apt-get install libopenblas0-pthread" >&2
    fi
fi

# OpenBLAS's worker threads spin against MLX's own on a 2-core machine: one BLAS thread
# made plain decoding of the default pair 37 -> 50 tokens/s here (speculative unchanged).
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

exec "${PYTHON:-python}" -m gemma_mtp_mlx bench "$@"
