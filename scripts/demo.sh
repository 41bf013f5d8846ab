#!/usr/bin/env bash
# The README demo: install, write a tiny random-weight checkpoint, start the server on CPU,
# ask it about an image, print the answer, stop the server. Random weights answer gibberish:
# the point is the whole path working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-ci.txt
.venv/bin/pip install -q --no-deps -e .
.venv/bin/python scripts/make_tiny_internvl.py --out checkpoints/tiny
.venv/bin/python - <<'PY'
import numpy as np
from PIL import Image
y, x = np.mgrid[0:480, 0:640]
Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save("checkpoints/demo.png")
PY
.venv/bin/python -m mmserver.api_server --model_dir checkpoints/tiny --enable_multimodal --device cpu --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server failed to start" >&2; exit 1; }
  sleep 1
done
.venv/bin/python scripts/client_example.py --url "http://127.0.0.1:$PORT" --image checkpoints/demo.png
.venv/bin/python scripts/client_example.py --url "http://127.0.0.1:$PORT" --image checkpoints/demo.png --stream
