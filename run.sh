#!/usr/bin/env bash
# Set up the environment (once per requirements.txt) and run the report or the tests.
#   ./run.sh report [run_report.py flags]   # the whole report on the embedded default (LiteMedSAM + phantom)
#   ./run.sh test [pytest flags]            # the test suite
#   ./run.sh python SCRIPT [flags]          # any script in the project's environment
# The virtual environment lives in ~/.cache/sam-btcv/venv-<hash of requirements.txt> (override with
# SAM_BTCV_VENV); it is rebuilt when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")"
hash=$(sha256sum requirements.txt | cut -c1-16)
venv=${SAM_BTCV_VENV:-$HOME/.cache/sam-btcv/venv-$hash}
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run only) ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  touch "$venv/.complete"
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  report) exec "$venv/bin/python" run_report.py "$@" ;;
  test) exec "$venv/bin/python" -m pytest -q tests "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) echo "usage: ./run.sh report|test|python ..." >&2; exit 2 ;;
esac
