#!/usr/bin/env bash
# The offline demo in one command (README.md gives it): on a fresh machine with no GPU it sets up the
# virtual environment (pinned versions), serves SAM 3 on the CPU with the tiny random-weight checkpoint
# (its masks are meaningless) and segments a sample photo over HTTP. Arguments go to tools.demo
# (--out DIR, --checkpoint DIR_OR_HUB_NAME for real weights, --port N).
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/venv.sh
ensure_venv server,tiny,demo
exec "$PYTHON" -m tools.demo "$@"
