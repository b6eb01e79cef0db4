#!/usr/bin/env bash
# The project's one test command (README.md gives it; .ci/run calls it): on a fresh machine it creates
# the virtual environment, installs the pinned versions we test, builds the tiny random-weight
# checkpoints into the test cache, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/venv.sh
ensure_venv server,jobs,tiny,demo,test

export SAM3_TEST_CACHE="${SAM3_TEST_CACHE:-$PWD/.cache/test}"
for size in 56 112; do
  "$PYTHON" -c "from tests.conftest import tiny_checkpoint_dir; print('tiny checkpoint (masks are meaningless):', tiny_checkpoint_dir($size))"
done
exec "$PYTHON" -m pytest "$@"
