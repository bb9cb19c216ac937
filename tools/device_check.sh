#!/usr/bin/env bash
# The one-shot device check (tools/device_check.py has the steps and the JSON it writes).
#
#   bash tools/device_check.sh [--dry-run] [--only STEP] [--out FILE] [--budget-s S]
#
# Runs from the source tree (PYTHONPATH = repo root; esmjax itself is not installed) with the
# image's python3 (override: PYTHON=...). The image provides JAX, flax, optax, orbax-checkpoint,
# torch and transformers. The packages esmjax needs beyond those (grain, array-record,
# tensorflow-datasets, tensorboardX and their dependencies) come from a wheel folder made beforehand
# on a machine with internet by `make device-wheels` (./device_wheels; DEVICE_WHEELS=... to move it)
# and are installed with --no-index into that python: pip takes only what the image lacks, and never
# touches the network. The benchmarks themselves import none of them; they make the same machine
# ready for `esmjax data` / `esmjax train`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${DEVICE_WHEELS:-device_wheels}
if [ -f "$WHEELS/requirements.txt" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
else
  echo "device_check: no $WHEELS/requirements.txt (make device-wheels): using the image's packages" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" tools/device_check.py "$@"
