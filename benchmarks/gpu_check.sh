#!/usr/bin/env bash
# The one device check (issue 21): every CUDA figure of benchmarks/results/gpu_check.md in one call, within about
# 8 minutes on one GPU. Run from the repository root on the lent machine after `pip install -e ".[test]"`:
#     bash benchmarks/gpu_check.sh [OUT]   # OUT: the results folder (default benchmarks/results)
# Each part has its own time limit, so that a slow part leaves the others their turn; the first part starts a fresh
# store (the figures of one device run, never mixed with an older one), the others add to it.
set -uo pipefail
OUT="${1:-benchmarks/results}"
ALL="bp bp-graph tpsgd-ce tpsgd-ce-compile tpsgd-ce-graph tpsgd-ce-compile-graph tpsgd tpsgd-compile tpsgd-graph tpsgd-compile-graph"
run() { local limit="$1"; shift; timeout "$limit" python -m benchmarks.steps "$@" --device cuda --out "$OUT" --name gpu_check; }
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" || exit 1
run 210 speed --fresh --steps 20 --precisions fp32 bf16 --models cnn2 convnet4 --batches 128 512 --methods $ALL tpsgd-ce-lean tpsgd-ce-lean-graph
run 60 speed --steps 20 --precisions fp32 bf16 --models adaptor --batches 64 --methods $ALL
run 60 speed --steps 20 --precisions fp32 bf16 --models rnn1 --batches 128 --methods $ALL
run 90 fit --steps 20 --precisions fp32 bf16 --methods bp tpsgd-ce tpsgd-ce,log_local_losses=false tpsgd-ce-compile tpsgd tpsgd-compile
run 45 memory --models rnn1-784 --methods bp tpsgd-l1
python -m benchmarks.steps --out "$OUT" --name gpu_check  # the report from whatever the parts stored
