#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on a lent GPU machine (Python 3.12, torch and transformers installed, no
# network), fetched here into .device/ (git-ignored, about 20 MB):
#   .device/wheels/     flashinfer-python 0.6.1 and apache-tvm-ffi, the HTTP stack (fastapi, starlette, uvicorn,
#                       pydantic, pydantic-core, annotated-types, typing-inspection, httptools, uvloop) and
#                       prometheus-client, as Python 3.12 manylinux wheels, without their dependencies (torch
#                       is there already)
#   .device/tokenizer/  all-MiniLM-L6-v2's tokenizer files, for gpu_check's http step (BERT base's shape)
# Then, one device call with `carry: [".device"]`:
#   pip install -q --no-index --no-deps .device/wheels/*.whl && python -c "import flashinfer, fastapi, uvicorn,
#   pydantic, prometheus_client" && timeout 560 python benchmarks/gpu_check.py --out $OUT/gpu \
#   --http-tokenizer .device/tokenizer --skip tp2,families,budget
# (#22's lines first: throughput/MFU, FlashInfer and CUDA-graph tests, FP8, fused ops, HTTP with and without
# graphs; tp2, families and budget ran on an earlier GPU and take ~3 of the 10 minutes one call may use.
# gpu_check.json is rewritten after every step, so a timeout keeps the steps that finished.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .device/wheels
mkdir -p .device/wheels .device/tokenizer
"$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .device/wheels \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any \
    flashinfer-python==0.6.1 apache-tvm-ffi fastapi starlette uvicorn pydantic pydantic-core annotated-types \
    typing-inspection httptools uvloop prometheus-client
"$PYTHON" - <<'PY'
import os
import shutil

from tp_embed.model_path import default_model_dir

src = default_model_dir()
for name in os.listdir(src):
    if name.startswith(("tokenizer", "special_tokens", "vocab")):
        shutil.copy(os.path.join(src, name), ".device/tokenizer")
PY
du -sh .device
