#!/usr/bin/env bash
# Train the shipped network further on a GPU machine, within a time budget, from a bundle written by
# benchmarks/training_bundle.py (the photos and labels travel; the teacher and ../shared need not).
#   bash benchmarks/gpu_train.sh BUNDLE [SECONDS=420] [INIT=rpn_cli/weights/rpn_mobilenet_v2_fpn.safetensors]
# One epoch first measures how long an epoch takes there; the real run then takes as many epochs of a
# cosine schedule as fit in what is left of SECONDS. Writes ${OUT:-.}/gpu_train.safetensors (its
# provenance holds the command and each epoch's figures) and ${OUT:-.}/gpu_train.log.
# On the lent machines (64 MiB travel with the repository): in the repo, once,
#   echo /.bundle/ >> .git/info/exclude
#   python benchmarks/training_bundle.py .bundle DATA... --validation-set VAL.json --work-dir DIR ...
# then run `bash benchmarks/gpu_train.sh .bundle` with .bundle carried. DEVICE=cpu runs it here, for a
# dry run on a small bundle. PRECISION=bfloat16 runs the forward pass under autocast (rpn train
# --precision; MobileNetV2 1.4-1.55x faster here on a CPU with bfloat16 units, Lite0 slower; untried
# on a GPU, where float32 convolutions already run as TF32). CLIP=N adds --clip-gradient-norm N. Score
# the result here on the original photos (rpn eval), not the bundle's.
# Relative paths are taken from the repository's root. Give the device call a limit above SECONDS plus a
# minute or two for start-up: the checkpoint is copied to OUT only at the end.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bundle="${1:?usage: gpu_train.sh BUNDLE [SECONDS] [INIT]}"
budget="${2:-420}"
init="${3:-rpn_cli/weights/rpn_mobilenet_v2_fpn.safetensors}"
device="${DEVICE:-cuda}"
[ -f "$bundle/train/instances.json" ] || { echo "error: $bundle/train/instances.json: no such file (a bundle from benchmarks/training_bundle.py?)" >&2; exit 2; }
out="${OUT:-.}"
mkdir -p "$out" || exit 1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$out/gpu_train.log"
python=python3
if [ "$device" = cuda ] && ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA GPU here (or no PyTorch that sees one): nothing to train"
    exit 0
fi
# The lent machines reach no registry: their own PyTorch, this checkout on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$(date +%s)
train=("$python" -m rpn_cli train "$bundle/train/instances.json" --init "$init" --device "$device"
       --batch-size "${BATCH:-16}" --lr "${LR:-0.02}" --seed "${SEED:-0}" --loader-threads "${THREADS:-12}"
       --precision "${PRECISION:-float32}")
[ -n "${CLIP:-}" ] && train+=(--clip-gradient-norm "$CLIP")
if [ -f "$bundle/validation/instances.json" ]; then
    train+=(--validation-set "$bundle/validation/instances.json")
else
    train+=(--validation 0)  # every photo trains; score the result here
fi

{
    echo "# gpu_train.sh $(date -u +%Y-%m-%dT%H:%MZ), budget ${budget} s, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "$device")"
    echo "## probe: one epoch"
    probe_started=$(date +%s)
    "${train[@]}" --epochs 1 --work-dir "$work/probe" 2>&1 || exit 1
    per_epoch=$(( $(date +%s) - probe_started ))
    left=$(( budget - ($(date +%s) - started) ))
    epochs=$(( left * 85 / 100 / (per_epoch > 0 ? per_epoch : 1) ))
    echo "one epoch took ${per_epoch} s; ${left} s left: ${epochs} epochs"
    if [ "$epochs" -lt 1 ]; then
        echo "no time left for a run: keeping the probe's epoch"
        cp "$work/probe/final.safetensors" "$out/gpu_train.safetensors" || exit 1
        exit 0
    fi
    echo "## run: ${epochs} epochs"
    "${train[@]}" --epochs "$epochs" --work-dir "$work/run" 2>&1 || exit 1
    cp "$work/run/final.safetensors" "$out/gpu_train.safetensors" || exit 1
    echo "wrote $out/gpu_train.safetensors in $(( $(date +%s) - started )) s"
} 2>&1 | tee "$log"
status=("${PIPESTATUS[@]}")
[ "${status[0]}" -ne 0 ] && exit "${status[0]}"
exit "${status[1]}"
