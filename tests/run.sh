#!/usr/bin/env bash
# The project's one test command (README.md gives it; .ci/run calls it): on a fresh machine it creates
# the virtual environment, installs the pinned versions we test, builds the tiny random-weight
# checkpoints into the test cache, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/venv.sh
ensure_venv server,jobs,tiny,demo,test

# tests/browser drives the system's Chromium (Playwright's own browser download cannot be reached). A
# failed install fails the command: the browser tests are never skipped.
if [ -z "${SAM3_CHROMIUM:-}" ] && ! command -v chromium >/dev/null; then
  echo "installing Chromium for tests/browser (apt-get)"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium fonts-liberation >/dev/null; }; then
    echo "ERROR: could not install Chromium (apt-get install chromium); tests/browser needs it" >&2
    exit 1
  fi
fi

export SAM3_TEST_CACHE="${SAM3_TEST_CACHE:-$PWD/.cache/test}"
for size in 56 112; do
  "$PYTHON" -c "from tests.conftest import tiny_checkpoint_dir; print('tiny checkpoint (masks are meaningless):', tiny_checkpoint_dir($size))"
done
exec "$PYTHON" -m pytest "$@"
