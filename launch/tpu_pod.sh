#!/usr/bin/env bash
# ESM-2 pretraining on a Cloud TPU VM slice.
#
# Process model: one process per TPU VM host, driving every chip of its host (4 on v4/v5p/v6e
# hosts). esmjax starts jax.distributed on every TPU VM (esmjax/parallel/distributed.py); JAX finds
# the slice's hosts and this host's id through the TPU metadata server.
#
#   TPU_NAME=esm-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh configs/esm2_3b.yaml gs://bucket/runs/3b \
#       --set data.train=gs://bucket/data/uniref50_ds
#
# Installs esmjax with its `tpu` and `gcs` extras (jax[tpu]==0.10.2 + libtpu, gcsfs; README "Install on a
# GPU cluster / a TPU VM", "Object storage") on every host, then starts the same command on all of them.
# The workdir and dataset are gs:// URLs every host reads with the TPU VM's service account
# (application-default credentials): Orbax writes the checkpoints from every host straight to the bucket,
# and each host streams the records it draws from the dataset by range requests, keeping only the index
# files on local disk (~/.cache/esmjax/staged, or ESMJAX_STAGE_DIR).
#
# XLA flags: LIBTPU_INIT_ARGS from `python -m esmjax.parallel.xla_flags tpu` (the flags
# `esmjax plan --target v5p-N` compiles with); LIBTPU_INIT_ARGS set on the hosts is appended and wins.
#
# Preemption: SIGTERM (a maintenance event, about 30 s of notice on spot VMs) makes esmjax save the
# current step and exit 75 (esmjax/train/preemption.py); this script then starts the command again,
# and it resumes from the latest checkpoint. When the hosts themselves went away (ssh fails, the
# slice is not READY), it waits for the slice to be READY again (a queued resource or a
# maintenance event brings it back; a deleted spot slice must be recreated by you) and restarts.
# At most ESMJAX_MAX_RESTARTS restarts (default 100); exit 0 means the run is finished.
#
# Inference jobs (README "Inference at scale"): --job and the esmjax command line instead of CONFIG
# WORKDIR; every host runs it on its own chips and takes its share of the work units, a restart
# skips the units done:
#   TPU_NAME=esm-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh --job embed --checkpoint gs://b/ckpt \
#       --fasta gs://b/uniref50.fasta.gz --out gs://b/emb --include mean
set -uo pipefail
if [ "${1:-}" = "--job" ]; then  # an inference job: esmjax's command line follows
  shift
  # Each host takes its share of the work units: its worker number and the slice's host count from
  # the TPU VM's metadata server (what JAX's own TPU cluster detection reads).
  md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  share="--process-id \$(curl -sf -H Metadata-Flavor:Google $md/agent-worker-number)"
  share="$share --num-processes \$(curl -sf -H Metadata-Flavor:Google $md/worker-network-endpoints | tr , '\\n' | wc -l)"
  run="$* --no-progress $share"
else
  config=${1:?config}; workdir=${2:?workdir}; shift 2
  run="train --config $config --workdir $workdir --no-progress $*"
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${ESMJAX_REPO:-https://github.com/esmjax/esmjax.git}
max_restarts=${ESMJAX_MAX_RESTARTS:-100}
poll=${ESMJAX_POLL_SECONDS:-60}
preempted=75  # esmjax.train.preemption.EXIT_PREEMPTED
remote="
  set -e
  test -d esmjax || git clone $repo esmjax
  cd esmjax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'
  export LIBTPU_INIT_ARGS=\"\$(.venv/bin/python -m esmjax.parallel.xla_flags tpu) \${LIBTPU_INIT_ARGS:-}\"
  set +e
  .venv/bin/esmjax $run
"
state() { gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --format='value(state)'; }
restarts=0
while :; do
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote"
  rc=$?
  [ "$rc" -eq 0 ] && exit 0
  if [ "$rc" -ne "$preempted" ]; then
    s=$(state)
    if [ "$s" = READY ] && [ "$rc" -ne 255 ]; then  # the hosts are there: a real error
      echo "tpu_pod.sh: esmjax failed with status $rc" >&2
      exit "$rc"
    fi
    echo "tpu_pod.sh: lost the hosts (status $rc, slice ${s:-unknown}); waiting for READY" >&2
    until [ "$(state)" = READY ]; do sleep "$poll"; done
  fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$max_restarts" ]; then
    echo "tpu_pod.sh: $max_restarts restarts used up (ESMJAX_MAX_RESTARTS)" >&2
    exit "$rc"
  fi
  echo "tpu_pod.sh: restart $restarts: resuming (the latest checkpoint, or the units not done)" >&2
done
