#!/usr/bin/env bash
# The main job: set up (first run only), then train one small model with AdamW, GaLore, Fira and
# FRUGAL and print loss and optimizer-state bytes side by side. Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/compare_optimizers.py "$@"
