# Sourced by the project's commands (tests/run.sh, tools/demo.sh), so that they set up the same
# virtual environment the same way: pinned versions from .ci/constraints.txt, the project installed
# editable. Run from the repository root.

# ensure_venv EXTRAS: create ${SAM3_VENV:-.venv} if missing, install the project with EXTRAS (e.g.
# "server,tiny,test") under the constraints, and set PYTHON to the venv's python.
ensure_venv() {
  local venv="${SAM3_VENV:-.venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  PYTHON="$venv/bin/python"
  "$PYTHON" -m pip install --quiet --upgrade pip
  "$PYTHON" -m pip install --quiet -c .ci/constraints.txt -e ".[$1]"
}
