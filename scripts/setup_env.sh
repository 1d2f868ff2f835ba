#!/usr/bin/env bash
# Sets up everything the course needs, on first use: a .venv, a CPU-only torch, the
# companion package (editable, with test extras), the packages installed with --no-deps,
# the offline data and the converted default model. Safe to run again: it skips what is done.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

"$PYTHON" - <<'PY' || { echo "error: the course needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "==> installing torch $TORCH_VERSION (CPU build)"
  if [ "$(uname -s)" = "Linux" ]; then
    # On Linux, PyPI's plain torch wheel pulls several GB of CUDA libraries. Asking for the
    # "+cpu" local version can only match a CPU build: from PyTorch's CPU index when it is
    # reachable, or from a local wheel/mirror that pip is configured with.
    extra=()
    if "$PY" -c "import urllib.request; urllib.request.urlopen('$TORCH_CPU_INDEX/', timeout=5)" 2>/dev/null; then
      extra=(--extra-index-url "$TORCH_CPU_INDEX")
    fi
    pip_install "torch==${TORCH_VERSION}+cpu" "${extra[@]}"
  else
    # macOS (and Windows) wheels on PyPI are CPU builds already.
    pip_install "torch==${TORCH_VERSION}"
  fi
fi
"$PY" -c "import torch, sys; sys.exit('error: a CUDA build of torch is installed in $VENV; delete $VENV and run make setup again' if torch.version.cuda else 0)"

echo "==> installing the companion package and its dependencies (with the test and web extras)"
pip_install -e ".[test,web]"
# The web chat's browser test needs a Chromium. As root with apt (CI), install Debian's
# chromium and its driver if missing; elsewhere the test says how and is skipped.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's chromium and chromium-driver (for the web chat's browser test)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "note: could not install chromium with apt; the browser test will be skipped" >&2
  fi
fi
echo "==> installing packages whose declared dependencies are broken (--no-deps)"
pip_install --no-deps -r requirements-nodeps.txt

echo "==> preparing offline data and the default model"
"$PY" -m companion.data fetch
"$PY" -m companion.models prepare
echo "==> setup done: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
