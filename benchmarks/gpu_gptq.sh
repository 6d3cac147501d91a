#!/usr/bin/env bash
# Issue 8's GPU scale check, prepared as one script for a session that is lent a device machine
# (< 10 min on one H100/H200-class GPU): GPTQ W4 g128 on every linear of DiT-XL/2 (random weights),
# 256 calibration records with both guidance branches.
#   1. ditq's block-wise engine on all 28 blocks (wall time, block forwards, peak RSS and GPU memory);
#   2. ours against the whole-model-per-block schedule on the first 4 blocks, both extrapolated.
# The device machine is bare: it needs torch with CUDA, diffusers, omegaconf, safetensors, tqdm
# (carry them as wheels if its image lacks them). Runs from the repository root without installing
# ditq (PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
"$PY" -c "import torch, diffusers, omegaconf, safetensors, tqdm; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())"
"$PY" benchmarks/bench_gptq.py --device cuda --blocks 28 --records 256 --batch 64 --skip-reference
"$PY" benchmarks/bench_gptq.py --device cuda --blocks 4 --records 256 --batch 64
