#!/usr/bin/env bash
# The main job on the embedded default: set up ./.venv, fetch and prepare the demo corpus, train the
# tiny SL LLaMA preset on 2 CPU (gloo) ranks, report validation perplexity before and after, save a
# checkpoint. Extra key=value overrides pass through (e.g. variant=dense).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
exec .venv/bin/megatron-sl demo "$@"
