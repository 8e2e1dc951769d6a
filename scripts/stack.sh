#!/usr/bin/env bash
# The production stack on one machine, without Docker (gptcore/stack.py says what runs):
#   bash scripts/stack.sh up DIR [--workers N] [--no-schedules]   then: source DIR/env.sh
#   bash scripts/stack.sh down DIR
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m gptcore.stack "$@"
