#!/usr/bin/env bash
# One device-machine session: GPU correctness, then the W1 serving benchmark with the
# transformers baseline on the 1B-size checkpoint. Writes logs and JSON under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
STEPS=${STEPS:-"check bench"}
if [[ $STEPS == *check* ]]; then
  python3 scripts/make_tiny_internvl.py --out /tmp/tiny --layout original >/dev/null
  timeout 200 python3 scripts/gpu_check.py /tmp/tiny 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log"
fi
SIZE=${SIZE:-1b}
CKPT=/tmp/ckpt-$SIZE
if [[ $STEPS == *graphs* || $STEPS == *bench* ]] && [ ! -d "$CKPT" ]; then
  python3 scripts/make_tiny_internvl.py --out "$CKPT" --layout hf --size "$SIZE" --dtype bfloat16 >/dev/null
fi
if [[ $STEPS == *graphs* ]]; then
  timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py -k on_gpu 2>&1 | tail -6 | tee "$OUT/graph_tests.log"
  for mode in "" "--no-graphs"; do
    timeout 90 python3 scripts/bench_decode.py --model_dir "$CKPT" --batch-sizes 1,8,64 --steps 50 $mode 2>&1 | tail -8 | tee -a "$OUT/decode.log"
  done
fi
if [[ $STEPS == *bench* ]]; then
  N=${N:-256}; C=${C:-64}; L=${L:-128}; W=${W:-W1}
  python3 -m mmserver.api_server --model_dir "$CKPT" --enable_multimodal --port 8000 ${SERVER_FLAGS:-} >"$OUT/server.log" 2>&1 &
  SRV=$!
  for i in $(seq 1 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  timeout 240 python3 scripts/benchmark_serving.py --url http://127.0.0.1:8000 --workload "$W" --num-requests "$N" \
    --concurrency "$C" --output-len "$L" --warmup 8 --json "$OUT/mmserver_${W}_${SIZE}.json" 2>&1 | tail -25 | tee "$OUT/bench.log"
  curl -s localhost:8000/metrics > "$OUT/metrics.txt"
  kill -TERM $SRV; wait $SRV
  if [ "${HF:-1}" = 1 ]; then
    timeout 200 python3 scripts/bench_hf.py --model_dir "$CKPT" --workload "$W" --num-requests "${HF_N:-128}" \
      --batch-size "${HF_B:-64}" --output-len "$L" --dtype bfloat16 --device cuda --json "$OUT/hf_${W}_${SIZE}.json" 2>&1 | tail -5 | tee "$OUT/hf.log"
  fi
fi
