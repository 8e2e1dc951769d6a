#!/usr/bin/env bash
# Create .venv and install gptcore into it (idempotent). torch is installed first, pinned, so
# pip does not pick a multi-GB build by itself: on a machine with a local CPU wheel (or where
# PIP_INDEX_URL points at the PyTorch CPU index) it stays light; set GPTCORE_TORCH to choose
# another spec, e.g. GPTCORE_TORCH="torch==2.13.0" with a CUDA index for GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${GPTCORE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
echo "gptcore is installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
