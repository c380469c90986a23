#!/usr/bin/env bash
# keras-defense launcher: sets up .venv (once per setup.py change), then runs
#   bash run.sh reproduce [flags...]   the MNIST reproduction (flags/mnist.flags)
#   bash run.sh test [pytest args...]  the import layers (lint-imports), then the test suite
#   bash run.sh setup                  only the set-up
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.keras-defense-$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing keras-defense and its pinned dependencies into .venv ..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  .venv/bin/python -m pip check
  touch "$stamp"
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  reproduce) exec .venv/bin/kd-experiment --flagfile=flags/mnist.flags "$@" ;;
  # First the import layers (.importlinter: bin > flags > pipelines > reports > evaluation >
  # defenses > training > attacks | models | data > util; a broken contract fails the
  # command), then the suite on KD_TEST_WORKERS pytest-xdist workers (default 2, one per
  # core of the 2-core machine it is budgeted on), a test file per worker at a time so module fixtures
  # are built once, in the order tests/conftest.py sorts them (longest first);
  # KD_TEST_WORKERS=0 runs it in this process.
  test) .venv/bin/lint-imports --no-logo --no-cache
        exec .venv/bin/python -m pytest -q -n "${KD_TEST_WORKERS:-2}" --dist loadfile \
          --no-loadscope-reorder "$@" ;;
  setup) echo "run.sh: .venv is ready" >&2 ;;
  *) echo "usage: bash run.sh reproduce|test|setup [args...]" >&2; exit 2 ;;
esac
