#!/usr/bin/env bash
# The GPU check on a bare, offline GPU machine (README, "GPU check"):
#
#   bash scripts/gpu_check.sh [options of python -m construct_lab.gpu_check]
#
# Installs the wheels carried in .whl/ (made by `make gpu-wheels`) into $GPU_CHECK_SITE
# (default /tmp/site) without dependencies or network, puts that folder first on PYTHONPATH (so
# the project's pins win over what the machine has, e.g. transformers 4.57.6 over 5.x), and runs
# the check. Without .whl/ it runs with whatever is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    echo "installing ${#wheels[@]} wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" -m construct_lab.gpu_check "$@"
