#!/usr/bin/env bash
# N JAX processes on this machine (127.0.0.1), CPU collectives (gloo): for tests and small runs.
# Needs the CPU build of JAX: pip install -e '.[cpu]' (make venv installs it), and bash 5.1 or later.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]
#   launch/local.sh 2 2 esmjax train --config configs/demo.yaml --workdir runs/mp
#
# Each process gets ESMJAX_COORDINATOR / ESMJAX_NUM_PROCESSES / ESMJAX_PROCESS_ID (read by esmjax's
# multi-process start-up) and JAX_NUM_CPU_DEVICES. Output lines are prefixed with [pI].
# Exit status: the first failing process's. When one fails, the others get SIGTERM, and SIGKILL
# ESMJAX_KILL_GRACE seconds later (default 10) if they have not ended: one blocked in a collective
# with the failed one would never end. 75 (preempted: stopped after saving a checkpoint, run again
# to resume) is no failure: the others are not stopped, and 75 is the status when no process fails.
# SIGTERM/SIGINT to this script send SIGTERM to every process (esmjax saves a checkpoint and exits
# with 75; a second SIGINT would abort it, so SIGINT is not passed on as SIGINT), and the script
# still exits with the processes' status.
set -uo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
nproc_=$1; ndev=$2; shift 2
grace=${ESMJAX_KILL_GRACE:-10}
# Process i is the job `RELAY | sed`: job[i] is sed's pid, by which `wait -n -p` names the job, and
# relay[i] the pid of a subshell that runs the command as its child, passes SIGTERM on to it and
# exits with its status (a command killed by signal N: 128 + N). The relay is there because bash
# drops a job that a signal killed from its table without handing its status to `wait -n`; a job
# that exits keeps it. With pipefail the job's status is the relay's: sed ignores INT/TERM (a Ctrl-C
# reaches the whole process group) and ends at the command's EOF, so every line is out by then.
relay=(); job=()
running=()  # indices of the jobs not ended yet
signal_running() {  # signal_running TERM | KILL
  local j
  for j in "${running[@]}"; do
    if [ "$1" = KILL ]; then  # the command, its relay and sed: a child it left could hold the pipe
      pkill -KILL -P "${relay[$j]}" 2>/dev/null
      kill -KILL "${relay[$j]}" "${job[$j]}" 2>/dev/null
    else
      kill -s "$1" "${relay[$j]}" 2>/dev/null
    fi
  done
}
# Trapped before any process starts, so that a signal cannot end this script and leave them behind.
stopping=""; trapped=""
trap 'stopping=1; trapped=1; signal_running TERM' TERM INT
port=${ESMJAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
for ((i = 0; i < nproc_; i++)); do
  (
    export ESMJAX_COORDINATOR="127.0.0.1:${port}" ESMJAX_NUM_PROCESSES="$nproc_" ESMJAX_PROCESS_ID="$i"
    export JAX_NUM_CPU_DEVICES="$ndev" JAX_PLATFORMS=cpu
    c=""; term=""
    trap 'term=1; if [ -n "$c" ]; then kill -TERM "$c" 2>/dev/null; fi' TERM
    "$@" &
    c=$!
    if [ -n "$term" ]; then kill -TERM "$c" 2>/dev/null; fi  # a SIGTERM came before it started
    rc=0
    while :; do  # until a wait returns the command's status, not one that SIGTERM cut short
      term=""
      wait "$c"
      r=$?
      if [ "$r" -ne 127 ]; then rc=$r; fi  # 127: its status was taken by the wait before
      if [ -z "$term" ]; then break; fi
    done
    exit "$rc"
  ) 2>&1 | (trap '' INT TERM; exec sed -u "s/^/[p$i] /") &
  job+=("$!")
  relay+=("$(jobs -p %+)")
  running+=("$i")
done
if [ -n "$stopping" ]; then  # signalled while starting them: the ones started since get it too
  signal_running TERM
fi
status=0    # the first failure's status, else 75 if a process was preempted, else 0
timer=""    # a sleep of the grace period, started at the first failure
while [ ${#running[@]} -gt 0 ]; do
  ids=()
  for i in "${running[@]}"; do ids+=("${job[$i]}"); done
  who=""; trapped=""
  wait -n -p who "${ids[@]}" ${timer:+"$timer"} 2>/dev/null  # no "Killed" job notice
  rc=$?
  if [ -z "${who:-}" ]; then
    if [ -z "$trapped" ]; then  # no signal cut the wait short: jobs killed after the grace period
      left=()                   # leave bash's table unreported; those whose sed is gone ended
      for i in "${running[@]}"; do
        if kill -0 "${job[$i]}" 2>/dev/null; then left+=("$i"); fi
      done
      if [ ${#left[@]} -eq ${#running[@]} ]; then sleep 0.1; fi
      running=("${left[@]}")
    fi
    continue
  fi
  if [ "$who" = "$timer" ]; then  # the grace period is over
    timer=""
    signal_running KILL
    continue
  fi
  left=()
  for i in "${running[@]}"; do
    if [ "${job[$i]}" = "$who" ]; then ended=$i; else left+=("$i"); fi
  done
  running=("${left[@]}")
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then
    status=$rc
    if [ ${#running[@]} -gt 0 ]; then
      echo "launch/local.sh: process $ended exited with status $rc; stopping the others" >&2
      signal_running TERM
      sleep "$grace" </dev/null >/dev/null 2>&1 &
      timer=$!
    fi
  elif [ "$rc" -eq 75 ] && [ "$status" -eq 0 ]; then
    status=75
  fi
done
if [ -n "$timer" ]; then
  kill "$timer" 2>/dev/null
fi
exit "$status"
