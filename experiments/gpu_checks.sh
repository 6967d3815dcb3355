#!/usr/bin/env bash
# The checks that need a CUDA machine, as one script (a borrowed GPU is short-lived: run them all
# at once): the machine, the GPU tests, the offload benchmark with hybrid modes on a real link, then
# quantized experts' decode speed against bf16.
#   bash experiments/gpu_checks.sh [RESULTS_DIR]      (default: gpu-results; needs moepic importable)
# Each step has its own time limit so that one hang leaves the others' results.
set -uo pipefail
results=${1:-gpu-results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # progress bars would garble the saved tables

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    lscpu | grep -E "^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))"
    echo "bf16/AMX flags: $(grep -o -w -E 'avx512_bf16|amx_bf16|amx_tile|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
} 2>&1 | tee "$results/machine.txt"

timeout 240 python -m pytest -q -p no:cacheprovider -rA -s tests/gpu 2>&1 | tee "$results/gpu-tests.txt"

timeout 150 python experiments/bench_offload_device.py --device cuda --layers 4 --budgets 0.25,0.5 --thetas 0.5 \
    --predictors gate_lookahead --hybrid off,auto,host-only --tokens 24 --repeats 3 2>&1 \
    | tee "$results/bench-offload-hybrid.txt"

timeout 90 python experiments/bench_quant_speed.py --device cuda --repeats 3 --tokens 32 2>&1 \
    | tee "$results/bench-quant-speed.txt"
