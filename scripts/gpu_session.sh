#!/usr/bin/env bash
# One device-machine session: GPU correctness, then the W1 serving benchmark with the
# transformers baseline on the 1B-size checkpoint. Writes logs and JSON under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# (no commit here: the device tool copies the working tree; record `git rev-parse --short HEAD` of the checkout that sent it)
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
STEPS=${STEPS:-"check bench"}
if [[ $STEPS == *check* ]]; then
  python3 scripts/make_tiny_internvl.py --out /tmp/tiny --layout original >/dev/null
  timeout 200 python3 scripts/gpu_check.py /tmp/tiny 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log"
fi
SIZE=${SIZE:-1b}
# RAM-backed: writing the 16 GB 8B checkpoint to the machine's disk takes minutes
CKPT=${CKPT_ROOT:-/dev/shm}/ckpt-$SIZE
if [[ $STEPS == *graphs* || $STEPS == *bench* || $STEPS == *vit* || $STEPS == *decode* ]] && [ ! -d "$CKPT" ]; then
  df -h "$(dirname "$CKPT")" | tail -1
  # random values drawn on the GPU: seconds for the 8B size, where the CPU takes minutes
  /usr/bin/time -f "checkpoint written in %e s" python3 scripts/make_tiny_internvl.py --out "$CKPT" --layout hf \
    --size "$SIZE" --dtype bfloat16 --device "${GEN_DEVICE:-cuda}" 2>&1 | tail -1
fi
if [[ $STEPS == *vit* ]]; then  # encoder alone, beside a decoding thread, beside a decoding process
  timeout 120 python3 scripts/bench_vit.py --model_dir "$CKPT" 2>&1 | grep -v Warn | tee "$OUT/vit.log"
  timeout 150 python3 scripts/bench_vit.py --model_dir "$CKPT" --decode-batch 64 --no-sdpa 2>&1 | grep -v Warn | tee -a "$OUT/vit.log"
  python3 scripts/bench_decode.py --model_dir "$CKPT" --batch-sizes 64 --steps 100000 >/dev/null 2>&1 &
  DEC=$!; sleep 25
  echo "beside a decoding process:" | tee -a "$OUT/vit.log"
  timeout 120 python3 scripts/bench_vit.py --model_dir "$CKPT" --no-sdpa 2>&1 | grep -v Warn | tee -a "$OUT/vit.log"
  kill $DEC; wait $DEC 2>/dev/null
fi
if [[ $STEPS == *decode* ]]; then
  timeout 240 python3 scripts/bench_decode.py --model_dir "$CKPT" --batch-sizes 1,8,64 --steps 30 --overlap both --profile 2>&1 \
    | grep -v "Warn\|INFO" | tee -a "$OUT/decode.log"
fi
if [[ $STEPS == *graphs* ]]; then
  timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py -k on_gpu 2>&1 | tail -6 | tee "$OUT/graph_tests.log"
  for mode in "" "--no-graphs"; do
    timeout 90 python3 scripts/bench_decode.py --model_dir "$CKPT" --batch-sizes 1,8,64 --steps 50 $mode 2>&1 | tail -8 | tee -a "$OUT/decode.log"
  done
fi
if [[ $STEPS == *bench* ]]; then
  N=${N:-256}; C=${C:-64}; L=${L:-128}
  # VARIANTS="off:--overlap_schedule=off on:--overlap_schedule=on": one server start per workload and
  # variant (name:flags, flags joined by commas), results named mmserver_${W}_${SIZE}_${name}.json
  for W in ${W:-W1}; do  # W="W1 W2": one server start per workload
  for V in ${VARIANTS:-":"}; do
    VN=${V%%:*}; VF=${V#*:}; TAG=${W}_${SIZE}${VN:+_$VN}
    python3 -m mmserver.api_server --model_dir "$CKPT" --enable_multimodal --port 8000 ${SERVER_FLAGS:-} ${VF//,/ } \
      >"$OUT/server.log" 2>&1 &
    SRV=$!
    for i in $(seq 1 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
    echo "== $TAG: ${SERVER_FLAGS:-} ${VF//,/ }"
    timeout 240 python3 scripts/benchmark_serving.py --url http://127.0.0.1:8000 --workload "$W" --num-requests "$N" \
      --concurrency "$C" --output-len "$L" --warmup 8 --json "$OUT/mmserver_${TAG}.json" 2>&1 | tail -14
    curl -s localhost:8000/metrics > "$OUT/metrics_${TAG}.txt"
    grep -v "^#" "$OUT/metrics_${TAG}.txt" | grep "ttft_stage\|vit_.*seconds\|requests_total"
    if [ "${PROFILE:-0}" = 1 ] && command -v py-spy >/dev/null; then  # where each process spends its time
      python3 scripts/benchmark_serving.py --url http://127.0.0.1:8000 --workload "$W" --num-requests 512 \
        --concurrency "$C" --output-len "$L" --seed 7 >/dev/null 2>&1 &
      BENCH=$!; sleep 6
      for name in http visual router; do
        pid=$SRV; [ $name != http ] && pid=$(pgrep -x "mms-$name" | head -1)
        py-spy record --nonblocking -p "$pid" -d 4 -r 250 --format raw -o "$OUT/prof_$name.txt" >/dev/null 2>&1 &
      done
      wait $BENCH
    fi
    kill -TERM $SRV; wait $SRV
  done
  done
  if [ "${HF:-1}" = 1 ]; then
    W=${HF_W:-W1}
    timeout 240 python3 scripts/bench_hf.py --model_dir "$CKPT" --workload "$W" --num-requests "${HF_N:-128}" \
      --batch-size "${HF_B:-64}" --output-len "$L" --dtype bfloat16 --device cuda --json "$OUT/hf_${W}_${SIZE}.json" 2>&1 | tail -5 | tee "$OUT/hf.log"
  fi
fi
