#!/usr/bin/env bash
# N JAX processes on this machine (127.0.0.1), CPU collectives (gloo): for tests and small runs.
# Needs the CPU build of JAX: pip install -e '.[cpu]' (make venv installs it).
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]
#   launch/local.sh 2 2 esmjax train --config configs/demo.yaml --workdir runs/mp
#
# Each process gets ESMJAX_COORDINATOR / ESMJAX_NUM_PROCESSES / ESMJAX_PROCESS_ID (read by esmjax's
# multi-process start-up) and JAX_NUM_CPU_DEVICES. Output lines are prefixed with [pI]. If one process fails, the
# others are stopped and the script exits with that process's status. SIGTERM/SIGINT are forwarded to all.
set -uo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
nproc_=$1; ndev=$2; shift 2
port=${ESMJAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done; }
trap 'cleanup' TERM INT
for ((i = 0; i < nproc_; i++)); do
  (
    export ESMJAX_COORDINATOR="127.0.0.1:${port}" ESMJAX_NUM_PROCESSES="$nproc_" ESMJAX_PROCESS_ID="$i"
    export JAX_NUM_CPU_DEVICES="$ndev" JAX_PLATFORMS=cpu
    exec "$@" 2>&1 | sed -u "s/^/[p$i] /"
  ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then
    rc=$?
    [ $status -eq 0 ] && status=$rc && cleanup
  fi
done
exit $status
