#!/usr/bin/env bash
# The main job: set up (first run only), then pretrain a tiny LLaMA on the embedded Shakespeare
# corpus with AdamW, GaLore, Fira, FRUGAL, APOLLO, APOLLO-Mini, GaLore-Adafactor, SLTrain and SST (one hydra
# multirun; wandb offline) and compare them:
# outputs/sweeps/cpu_compare/report.md with its plots. Extra arguments go to the multirun
# (e.g. train.steps=100, output_root=elsewhere). Finished runs are not trained again, an interrupted
# one resumes from its last complete checkpoint; delete the folder (or add train.resume=never) to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/pretrain.py -m experiment=cpu_compare method=adamw,galore,fira,frugal,apollo,apollo_mini,galore_adafactor,sltrain,sst \
  sweep_name=cpu_compare "$@"
root=outputs  # where the sweep went: output_root=... among the arguments moves it
for argument in "$@"; do
  case "$argument" in output_root=*) root="${argument#output_root=}" ;; esac
done
.venv/bin/python scripts/compare.py "$root/sweeps/cpu_compare"
