#!/usr/bin/env bash
# The production stack on one machine, without Docker (gptcore/stack.py says what runs):
#   bash scripts/stack.sh up DIR [--workers N] [--no-schedules]   then: source DIR/env.sh
#   bash scripts/stack.sh down DIR
# Serving replicas behind nginx (gptcore/balancer.py):
#   bash scripts/stack.sh serve DIR --model URI [--replicas N]     then: source DIR/env.sh
#   bash scripts/stack.sh serve-down DIR
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  serve) shift; exec .venv/bin/python -m gptcore.balancer up "$@" ;;
  serve-down) shift; exec .venv/bin/python -m gptcore.balancer down "$@" ;;
  *) exec .venv/bin/python -m gptcore.stack "$@" ;;
esac
