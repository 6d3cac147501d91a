#!/usr/bin/env bash
# Build the isolated environment that scripts/parity_t2i.py runs the upstream packages in.
# It is NOT the project environment: it holds torchvision, timm 0.6.13, transformers 4.36,
# protobuf<4, setuptools<81 (openai-clip imports pkg_resources) and the upstream `image-reward`
# 1.5 and `hpsv2` 1.2.0 packages, none of which may enter .venv. About 5.5 GB (PyPI's CUDA build
# of torch, run on CPU here).
#
#   bash scripts/parity_t2i_env.sh [VENV_DIR]      (default /tmp/t2i_parity_venv)
set -euo pipefail
VENV=${1:-/tmp/t2i_parity_venv}
PYTHON=${PYTHON:-python3}

# Ignore local pip configuration: a find-links directory with a CPU-only torch wheel would be
# preferred over PyPI's build, and torchvision's PyPI wheel needs PyPI's torch.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS || true
export PIP_NO_CACHE_DIR=1

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
CONSTRAINTS="$VENV/parity-constraints.txt"
printf 'torch==2.13.0\ntorchvision==0.28.0\nsetuptools>=77.0.3,<81\n' > "$CONSTRAINTS"

"$PIP" install -q -c "$CONSTRAINTS" torch==2.13.0 torchvision==0.28.0 "setuptools>=77.0.3,<81"
# What image-reward 1.5 imports (its ImageReward/__init__ pulls ReFL: diffusers, accelerate,
# datasets; its CLIP/Aesthetic scores: OpenAI's `clip`, here from the `openai-clip` wheel), with
# versions that still work with its med.py (transformers 4.x) and timm 0.6.13; what hpsv2 1.2.0
# imports (protobuf<4, webdataset, ...); open_clip_torch only for its BPE vocabulary file;
# torchmetrics for the CLIP-score check.
"$PIP" install -q -c "$CONSTRAINTS" \
    "numpy<2" "transformers==4.36.2" "tokenizers==0.15.2" "huggingface_hub==0.20.3" "diffusers==0.25.1" \
    "accelerate==0.26.1" "datasets==2.16.1" "pyarrow==15.0.2" "pandas==2.2.3" "timm==0.6.13" \
    "fairscale==0.4.13" "openai-clip==1.0.1" "ftfy==6.3.1" regex "protobuf<4" einops braceexpand \
    webdataset sentencepiece clint "open_clip_torch==2.32.0" "torchmetrics==1.6.3"
# The upstream packages themselves, without their pins (hpsv2 pins pytest 7.2; image-reward's
# PyPI metadata asks for versions resolved above).
"$PIP" install -q --no-deps -c "$CONSTRAINTS" "image-reward==1.5" "hpsv2==1.2.0"

# hpsv2's wheel lacks its tokenizer vocabulary; open_clip's wheel ships the same file.
SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
cp "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/"

HF_HUB_OFFLINE=1 "$VENV/bin/python" -W ignore -c \
    "import ImageReward, hpsv2.evaluation, torchmetrics.multimodal, torchvision; print('parity env ready:', '$VENV')"
