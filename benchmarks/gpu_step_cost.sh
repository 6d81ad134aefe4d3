#!/usr/bin/env bash
# The GPU step-cost measurements in one run: roberta-base size (random weights), the paper's batch (64 rows per
# source), ACL-ARC. For each setting, benchmarks/step_cost.py's table and JSON line go to one file under $OUT (default:
# benchmarks/gpu_results), every setting's log to logs.txt and the machine's GPU and package versions to env.txt there
# (eight files with the six default settings: what a lent GPU machine sends back is at most eight, so a further
# setting is run only when named, in place of one of them). The tables are printed again at the end.
# Planned to fit 10 minutes on one H100 or H200 with the steps below; BUDGET_S (default 540) caps the whole run:
# each setting runs under `timeout` for what is left of it, in the order below (most wanted first), and a setting
# that cannot start or finish in time is reported as failed while the results of the others stand.
#
#   bf16_real      bf16, real lengths: every variant the targets compare (MFU, META/MT, META/paper META), with
#                  each variant's costliest kernels (--profile)
#   bf16_512       bf16, every row 512 tokens: fine-tuning and MT-TARTAN MFU at full length
#   fp16_real      fp16, real lengths: META/MT, to compare with bf16's, kernels too (why fp16's META is slower)
#   bf16_packed    bf16, real lengths, --pack-sequences: what computing no padding buys (the same model FLOPs as
#                  bf16_real's, which count real tokens only, in a shorter step)
#   bf16_compiled  bf16, real lengths, --compile: what torch.compile buys
#   bf16_grouped   bf16, real lengths, --group-by-length: what less padding buys (measured once already: last)
#   bf16_512_compiled  (only when named) bf16, 512 tokens, --compile: fine-tuning and MT-TARTAN MFU compiled
#   bf16_packed_compiled  (only when named) bf16, real lengths, --pack-sequences --compile: packing where the
#                  step is no longer bound by the host issuing kernels
#   bf16_multi_tensor  (only when named) bf16_real's variants with the multi-tensor AdamW (the default there is
#                  fused): what the fused optimizer buys
#   bf16_512_checkpointed  (only when named) bf16, 512 tokens, --gradient-checkpointing: the memory it saves and
#                  the time it costs at full length, against bf16_512
#
# Name settings to run only those, in that order: bash benchmarks/gpu_step_cost.sh bf16_real fp16_real
#
# PYTHON names the interpreter (default python3, the one with torch on the GPU machines' image).
#
# On a machine without a GPU, SMOKE=1 runs the same settings on the CPU with the tiny encoder and one timed step,
# to check the script before spending GPU time:  SMOKE=1 OUT=/tmp/gpu_smoke bash benchmarks/gpu_step_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_results}
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-540}))
python=${PYTHON:-python3}
: > "$out/logs.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$python" -c 'import torch, transformers, pytorch_lightning as pl; print("torch", torch.__version__,
        "transformers", transformers.__version__, "pytorch_lightning", pl.__version__)'
} > "$out/env.txt"
data=()
if [[ -n "${DSP:-}" ]]; then  # the offline GPU machine's staged data (.devstage/preamble.sh)
    data=(--data-dir "$DSP/citation_intent")
fi
if [[ -n "${SMOKE:-}" ]]; then
    common=(--device cpu --encoder tiny --quick "${data[@]}")
else
    common=(--device cuda --encoder roberta-base-random --paper-batch --steps 12 --rounds 1 "${data[@]}")
fi

failed=()
run() {  # a failed setting does not stop the others; the script's exit status says whether any failed
    local name=$1 left=$((deadline - SECONDS))
    shift
    echo "== $name ($left s left): $*" | tee -a "$out/logs.txt" >&2
    if (( left < 30 )); then
        echo "$name not run: the budget is spent" | tee -a "$out/logs.txt" >&2
        failed+=("$name")
        return
    fi
    timeout "$left" "$python" benchmarks/step_cost.py "${common[@]}" "$@" > "$out/$name.txt" 2>> "$out/logs.txt" || {
        echo "$name failed (exit $?): see $out/logs.txt" >&2
        tail -5 "$out/logs.txt" >&2
        failed+=("$name")
    }
}

precision() {  # bf16 and fp16 on a GPU; the CPU smoke run has fp32 only
    if [[ -n "${SMOKE:-}" ]]; then echo 32-true; else echo "$1"; fi
}

declare -A settings=(  # name -> options
    [bf16_real]="--precision $(precision bf16-mixed) --profile 12 --variants finetune mt1 mt2 meta1 meta2 paper_meta1"
    [bf16_512]="--precision $(precision bf16-mixed) --fixed-length 512 --variants finetune mt1"
    [fp16_real]="--precision $(precision 16-mixed) --profile 12 --variants mt1 mt2 meta1 meta2"
    [bf16_grouped]="--precision $(precision bf16-mixed) --group-by-length --variants finetune mt2 meta2"
    [bf16_packed]="--precision $(precision bf16-mixed) --pack-sequences --variants finetune mt2 meta2"
    [bf16_compiled]="--precision $(precision bf16-mixed) --compile --warmup 4 --variants finetune mt2 meta2"
    [bf16_512_compiled]="--precision $(precision bf16-mixed) --fixed-length 512 --compile --warmup 4 --variants finetune mt1"
    [bf16_packed_compiled]="--precision $(precision bf16-mixed) --pack-sequences --compile --warmup 4 --variants finetune mt2 meta2"
    [bf16_multi_tensor]="--precision $(precision bf16-mixed) --no-fused-optimizer --variants finetune mt1 mt2 meta1 meta2"
    [bf16_512_checkpointed]="--precision $(precision bf16-mixed) --fixed-length 512 --gradient-checkpointing --variants finetune mt1"
)
chosen=("$@")
if (( ! ${#chosen[@]} )); then
    chosen=(bf16_real bf16_512 fp16_real bf16_packed bf16_compiled bf16_grouped)
fi
for name in "${chosen[@]}"; do
    [[ -v "settings[$name]" ]] || { echo "unknown setting $name; known: ${!settings[*]}" >&2; exit 2; }
done
for name in "${chosen[@]}"; do
    read -ra options <<< "${settings[$name]}"
    run "$name" "${options[@]}"
done
for name in "${chosen[@]}"; do  # each table without its JSON line and its --profile tables (both in the file)
    [[ -s "$out/$name.txt" ]] && {
        echo "== $name"
        awk '/: the costliest operations of one step$/ { skip = 1 } /^variant / { skip = 0 } !skip && !/^[{]/' \
            "$out/$name.txt"
    }
done
echo "results in $out" >&2
if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
