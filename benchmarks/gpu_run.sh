#!/usr/bin/env bash
# The GPU run, in one go (a lent GPU machine is held by the minute): what the machine is, the CUDA-only
# tests, every benchmark at its GPU size, the real-size LoRA steps, and the demo on CUDA.
#
#   bash benchmarks/gpu_run.sh OUT [PART ...]     PART: env tests bench real memory demo (default: all, in order)
#
# Everything printed also goes to OUT/run.log; tables to OUT/bench/results.md + results.json, the demo's
# report to OUT/demo/. Each part has its own time limit, so one that hangs does not take the others.
set -uo pipefail
out=${1:?usage: gpu_run.sh OUT [env tests bench real memory demo]}
shift
parts=${*:-env tests bench real memory demo}
mkdir -p "$out"
exec > >(tee -a "$out/run.log") 2>&1
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS CMD...: run CMD under a time limit and say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "=== $name: exit $?"
}

for p in $parts; do
    case $p in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            torch.cuda.get_device_name(), '| diffusers', diffusers.__version__)"
        python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null \
            || echo "flash-attn: not installed (windowed attention takes FlexAttention)"
        ;;
    tests) part tests 240 python3 -m pytest -q -rs -s tests/test_attention.py tests/test_dit.py \
        tests/test_distributed.py tests/test_offload.py -k "cuda" ;;
    bench)
        part bench 600 python3 -m benchmarks.run_all --device cuda --sizes small gpu --repeats 5 \
            --out "$out/bench"
        ;;
    real)
        for preset in wan2.1-1.3b paper wan2.1-14b; do
            part "real $preset" 240 python3 -m benchmarks.bench_personalize --device cuda --real-size "$preset" \
                --repeats 3 --json "$out/bench/real-$preset.json"
        done
        ;;
    memory)  # bf16 / fp8 / fp8 + offload K, peak memory and step time (benchmarks/bench_memory.py)
        for preset in wan2.1-1.3b wan2.1-14b; do
            part "memory $preset" 900 python3 -m benchmarks.bench_memory --device cuda --presets "$preset" \
                --json "$out/bench/memory-$preset.json"
        done
        ;;
    demo) part demo 420 python3 -m setseq demo --device cuda --out "$out/demo" --no-progress ;;
    *) echo "unknown part $p (env tests bench real memory demo)" && exit 2 ;;
    esac
done
