#!/usr/bin/env bash
# Where a decode-attention kernel spends its instructions (device machine, Nsight Compute on PATH):
# per-opcode executed-instruction counts, and the SASS listing with per-instruction execution counts and stall
# samples, for one config at batch 32 x 16K. Usage: bash benchmarks/ncu_sass.sh CONFIG TUNING_JSON OUT_DIR
# e.g. bash benchmarks/ncu_sass.sh 4/4 '{"precision":"bf16"}' out/ncu
# The Mosaic GPU kernel's name ends in _mosaic_gpu: NCU_KERNEL=regex:mosaic_gpu with '{"kernel":"mgpu"}'.
set -euo pipefail
cfg=$1
tuning=$2
out=$3
name=$(echo "$cfg" | tr '/' 'x')
mkdir -p "$out"
run=(python3 benchmarks/attention.py --once "$cfg" --batches 32 --contexts 16384 --tuning "$tuning")
common=(--clock-control none --kernel-name "${NCU_KERNEL:-regex:paged}" --launch-count 1)
metrics=sass__inst_executed_per_opcode,smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size
metrics+=,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__waves_per_multiprocessor
ncu "${common[@]}" --metrics "$metrics" \
    --print-metric-instances values "${run[@]}" >"$out/${name}_opcodes.txt" 2>&1
ncu "${common[@]}" --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
    "${run[@]}" >"$out/${name}_sass.csv" 2>&1
