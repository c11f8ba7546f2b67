#!/usr/bin/env bash
# Call 1 of the GPU check (cheap): carries .carry/m1 and .carry/whl, installs the wheels into
# /tmp/site and checks that the carried transformers and peft import on the device's torch,
# with peft_minimal on top, before call 2 (tools/device_run.sh) spends minutes on it.
#
#   bash tools/device_stage.sh
#
# What call 1 carried stays on the machine while it is warm (30 s): call 2 must follow at once.
set -u
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
nproc; df -h /tmp | tail -1; command -v timeout torchrun
ls -la .carry .carry/whl 2>&1
timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .carry/whl/*.whl && echo "wheels installed in $SITE" || echo "ERROR: pip install failed"
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 120 $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "tokenizers", "huggingface_hub", "safetensors", "accelerate",
             "sklearn", "numpy", "regex", "tqdm", "peft_minimal.runs", "peft_minimal.bench",
             "peft_minimal.scale_out"):
    try:
        m = importlib.import_module(name)
        print(f"{name:24s} {getattr(m, '__version__', '-'):14s} {getattr(m, '__file__', None)}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:24s} IMPORT FAILED: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "nccl",
      torch.cuda.nccl.version() if torch.cuda.is_available() else None)
from transformers import BertForSequenceClassification
print("activation_checkpointing_enable:", hasattr(BertForSequenceClassification, "activation_checkpointing_enable"))
EOF
echo "stage rc=$?"
