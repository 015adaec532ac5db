#!/usr/bin/env bash
# On a CUDA machine whose python3 has PyTorch (and no network): install the wheels from
# hack/gpu-wheels.sh, then run the named stages from the repository root:
#   bash hack/gpu-run.sh probe tests sharded adapters liger full lora lora-no-checkpointing \
#     full-liger lora-liger full-profile strategies
# Logs and results go to $OUT (default /tmp/gpu-out); each stage has its own time limit,
# each under 10 minutes (what one command may run on a lent machine).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out} WHEELS=${WHEELS:-.whl} SITE=${SITE:-/tmp/lmforge-site}
mkdir -p "$OUT" "$SITE/bin"
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 && touch "$SITE/.installed"
fi
# One import package from the three source roots, as setup.py's package_dir maps them
# (links in the checkout, removed again on exit).
ln -sfn ../trainer/lmforge/trainer lmforge/trainer
ln -sfn ../operator/lmforge/operator lmforge/operator
trap 'rm -f lmforge/trainer lmforge/operator' EXIT
printf '#!/bin/sh\nexec python3 -m lmforge.cli "$@"\n' > "$SITE/bin/lmforge"
chmod +x "$SITE/bin/lmforge"
export PYTHONPATH=$PWD:$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
stage() {
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
for s in "$@"; do
  case $s in
    probe) stage probe 60 python3 -c "
import torch, transformers, trl, peft, bitsandbytes, deepspeed, liger_kernel
print(torch.cuda.get_device_name(0), torch.__version__, transformers.__version__, trl.__version__)" ;;
    tests) stage tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests \
      --deselect tests/e2e/test_sharded_gpu.py ;;
    sharded) stage sharded 560 python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/e2e/test_sharded_gpu.py -k "not lora and not liger" ;;  # ~80 s a strategy (an H100)
    adapters) stage adapters 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/e2e/test_sharded_gpu.py -k "lora and not qlora and not liger" ;;
    liger) stage liger 560 python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/e2e/test_sharded_gpu.py -k liger ;;
    full) stage full 420 python3 -m benchmarks.gpu_training --only full --out "$OUT/gpu_training.json" ;;
    lora) stage lora 560 python3 -m benchmarks.gpu_training --only lora --out "$OUT/gpu_training.json" ;;
    lora-no-checkpointing) stage lora-no-checkpointing 560 python3 -m benchmarks.gpu_training \
      --only lora-no-checkpointing --out "$OUT/gpu_training.json" ;;
    full-liger) stage full-liger 420 python3 -m benchmarks.gpu_training --only full-liger \
      --out "$OUT/gpu_training.json" ;;
    lora-liger) stage lora-liger 560 python3 -m benchmarks.gpu_training --only lora-liger \
      --out "$OUT/gpu_training.json" ;;
    full-profile) stage full-profile 420 python3 -m benchmarks.gpu_training --only full \
      --profile --out "$OUT/gpu_training-profile.json" ;;  # its own file: profiled timings
    strategies) stage strategies 560 python3 benchmarks/gpu_strategies.py --out "$OUT" ;;
    *) echo "unknown stage $s (see the top of this file)" >&2; exit 2 ;;
  esac
done
