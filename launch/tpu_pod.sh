#!/usr/bin/env bash
# ESM-2 pretraining on a Cloud TPU pod slice (one process per TPU VM host).
#
#   TPU_NAME=esm-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh configs/esm2_3b.yaml gs://bucket/runs/3b \
#       --set data.train=gs://bucket/data/uniref50_ds
#
# Installs esmjax with its `tpu` and `gcs` extras (jax[tpu]==0.10.2 + libtpu, gcsfs; README "Install on a
# GPU cluster / a TPU VM", "Object storage") on every host, then starts the same command on all of them;
# jax.distributed.initialize() detects the pod (coordinator, process ids) by itself. The workdir and dataset are
# gs:// URLs every host reads with the TPU VM's service account (application-default credentials): Orbax writes
# the checkpoints from every host straight to the bucket, and each host streams the records it draws from the
# dataset by range requests, keeping only the index files on local disk (~/.cache/esmjax/staged, or
# ESMJAX_STAGE_DIR); a dataset built before token files existed is staged whole there instead.
# Preemptible/spot slices: SIGTERM (about 30 s of notice) saves the current step within one step and exits 0;
# re-run the same command after the slice is back and it resumes.
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${ESMJAX_REPO:-https://github.com/esmjax/esmjax.git}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  test -d esmjax || git clone $repo esmjax
  cd esmjax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'
  export LIBTPU_INIT_ARGS=\"\$(.venv/bin/python -m esmjax.parallel.xla_flags tpu) \${LIBTPU_INIT_ARGS:-}\"
  .venv/bin/esmjax train --config $config --workdir $workdir --no-progress $*
"
