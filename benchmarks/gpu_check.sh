#!/usr/bin/env bash
# The GPU-path check (docs/architecture.md, "GPU path"): benchmarks.step_speed on one GPU for the shipped GPU configs,
# eager and compiled (inductor), in each config's precision (bf16), on synthetic clips (no decoder needed).
#
#   bash benchmarks/gpu_check.sh [step_speed options and key=value overrides for every run]
#
# Prints one JSON line per run (an {"error": ...} line for a run that fails or times out; the exit status is then
# 1), first one about the environment. A few minutes on an H100/H200, most of it compiling. Needs a python with
# torch, timm, accelerate, einops, safetensors and pyyaml; decord, PyAV and webdataset are not needed.
# Environment: PYTHON (default python3), CONFIGS (default: the 224-px config first, then the 64-px one), STEPS
# (timed steps, default 15), WARMUP (default 3), RUN_TIMEOUT (seconds per run, default 180).
set -u
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-"configs/gpu_vits224.yaml configs/gpu_vits.yaml"}
STEPS=${STEPS:-15}
WARMUP=${WARMUP:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}

"$PYTHON" - <<'EOF'
import json, platform
import accelerate, timm, torch
info = {"kind": "environment", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "timm": timm.__version__, "accelerate": accelerate.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
print(json.dumps(info), flush=True)
EOF

status=0
for config in $CONFIGS; do
    for compile in false true; do
        timeout "$RUN_TIMEOUT" "$PYTHON" -m benchmarks.step_speed --config "$config" --synthetic \
            --steps "$STEPS" --warmup "$WARMUP" "train.compile=$compile" "$@"
        code=$?
        if [ "$code" -ne 0 ]; then
            echo "{\"config\": \"$config\", \"compile\": $compile, \"error\": \"exit status $code (124: timed out)\"}"
            status=1
        fi
    done
done
exit "$status"
