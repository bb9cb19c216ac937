#!/usr/bin/env bash
# Where the time of a 2-process demo step streamed from the GCS emulator goes.
# Usage: QUEUE=5|1024 STEPS=12 tools/bench_emulator_stream.sh  (BENCHMARKS.md "Streaming from the GCS emulator")
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/esmjax_emulator_stream}; mkdir -p $OUT
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
queue=${QUEUE:-1024}
$PY -c "import sys, http.server; http.server.HTTPServer.request_queue_size = $queue; from gcp_storage_emulator.__main__ import main; main(sys.argv[1:])" start --host 127.0.0.1 --port $port --default-bucket esmjax-test --in-memory >/dev/null 2>&1 &
emu=$!
sleep 3
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$port TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:$port GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator ESMJAX_CHECKPOINT_OCDBT=0 ESMJAX_STAGE_DIR=$OUT/stage ESMJAX_LOG=WARNING
$PY -m esmjax.cli data build --fasta data/cath_s20.fa.gz --out gs://esmjax-test/ds --val-fraction 0.02 >/dev/null 2>&1
[ -d $OUT/ds ] || $PY -m esmjax.cli data build --fasta data/cath_s20.fa.gz --out $OUT/ds --val-fraction 0.02 >/dev/null 2>&1
steps=${STEPS:-12}
common="--no-progress --config configs/demo.yaml --set num_steps=$steps --set log_every=1 --set eval_every=0 --set checkpoint.every=1000"
run() {  # run NAME DATA WORKDIR [py-spy]
  local t0=$(date +%s.%N)
  if [ "${4:-}" = spy ]; then
    .venv/bin/py-spy record --subprocesses --idle --format raw -r 25 -o $OUT/$1.raw -- launch/local.sh 2 2 $PY -m esmjax.cli train $common --workdir $3 --set data.train=$2 > $OUT/$1.log 2>&1
  else
    launch/local.sh 2 2 $PY -m esmjax.cli train $common --workdir $3 --set data.train=$2 > $OUT/$1.log 2>&1
  fi
  echo "$1 rc=$? wall=$(echo "$(date +%s.%N) - $t0" | bc)"
}
rm -rf $OUT/w_*
[ -z "${ONLY:-}" ] && run local_data $OUT/ds $OUT/w_local
run stream gs://esmjax-test/ds $OUT/w_stream
[ -z "${ONLY:-}" ] && run stream_gsworkdir gs://esmjax-test/ds gs://esmjax-test/runs/a
[ -n "${SPY:-}" ] && run stream_spy gs://esmjax-test/ds $OUT/w_spy spy
kill $emu
