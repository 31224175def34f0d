#!/usr/bin/env bash
# The whole test suite on a fresh machine: sets up ./.venv, then runs pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TRITON_DEFAULT_FP_FUSION=1
exec .venv/bin/python -m pytest tests "$@"
