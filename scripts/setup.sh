#!/usr/bin/env bash
# Creates .venv (if missing) and installs moe_router into it with the test, hf and titan
# extras (MOE_ROUTER_EXTRAS overrides the list, e.g. MOE_ROUTER_EXTRAS=test). The extras go
# in one pip call: torchtitan pins datasets<4.8, and only a resolver that sees transformers'
# huggingface-hub>=2.4 too picks a datasets release compatible with both.
#
# torch is installed first and only when .venv has none: `torch==2.13.0` by default, which is
# the CUDA build from PyPI on a GPU machine and the local CPU wheel where pip is pointed at
# one. Set TORCH_SPEC (e.g. "torch --index-url https://download.pytorch.org/whl/cu126") to
# choose another build; an already installed torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${MOE_ROUTER_EXTRAS:-test,hf,titan}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several pip arguments
    .venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
