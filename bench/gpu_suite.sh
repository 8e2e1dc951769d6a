#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py): every CUDA path verified and measured in one run.
#   bash bench/gpu_suite.sh --out DIR [--dry-run] [--budget S] [--only STEP...]
# Python: $PYTHON, else this checkout's .venv (scripts/setup.sh), else python3 (a GPU image's own).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" bench/gpu_suite.py "$@"
