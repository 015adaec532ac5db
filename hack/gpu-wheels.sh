#!/usr/bin/env bash
# Wheels for running the GPU tests and `make bench-gpu` on a CUDA machine whose Python
# already has PyTorch and no network (a lent GPU box): the pinned versions
# (requirements.lock) of what such an image lacks or holds in other versions, for
# CPython 3.12 on x86-64, into DIR (default .whl, which hack/gpu-run.sh installs from).
# bitsandbytes keeps its CUDA 13 libraries only (the rest would triple its size);
# DeepSpeed has no wheel on PyPI, so one is built here (pure Python, ops built on use).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:-.whl}")
mkdir -p "$dir"
names="transformers trl peft datasets huggingface_hub tokenizers bitsandbytes liger_kernel pydantic
  pydantic_core annotated-types typing-inspection dill multiprocess fsspec httpx2 httpcore2
  hjson regex click sniffio truststore"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in $names; do
  pin=$(grep -i "^${name//[-_]/[-_]}==" requirements.lock)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dir" "$pin"
done
bnb=$(ls "$dir"/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && python3 -m zipfile -e "$bnb" . \
  && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so \
  && sed -i '/libbitsandbytes_cuda1[12][0-9]*\.so/d' bitsandbytes-*.dist-info/RECORD \
  && rm "$bnb" && python3 -m zipfile -c "$bnb" ./*)
rm -rf "$tmp"
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$dir" \
  "$(grep -i '^deepspeed==' requirements.lock)"
du -sh "$dir"
