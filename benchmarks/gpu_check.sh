#!/usr/bin/env bash
# The GPU check in one command, on a fresh GPU machine with this repo: set up, run the cuda tests and the
# GPU benchmark, write the report to ${OUT:-.}/gpu_report.md. Made to finish within 8 minutes.
# On a machine without a CUDA GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh [PHOTOS_FOLDER]
# Setup: where the registries are reachable, a venv from constraints.txt (the tested versions); where
# they are not (the lent H200 machines), the machine's own python3 with its PyTorch, this package
# installed without dependencies (carry wheels for what that python lacks, see .library/device).
set -uo pipefail
cd "$(dirname "$0")/.."
report="${OUT:-.}/gpu_report.md"
photos="${1:-}"

python=python3
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA GPU here (or no PyTorch that sees one): nothing to check"
    exit 0
fi
if timeout 240 "$python" -m pip install --quiet -c constraints.txt -e ".[test]" 2>/dev/null; then
    setup="pip install -c constraints.txt -e .[test]"
else
    timeout 120 "$python" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    setup="the machine's own packages (no registry reachable), this checkout on PYTHONPATH"
fi

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    echo "- PyTorch: $("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    echo "- CPU cores: $(nproc); setup: $setup"
    echo
    echo '## cuda tests'
    echo
    echo '```'
    timeout 180 "$python" -m pytest -q -m cuda -p no:cacheprovider tests/inference/test_cuda.py -rs 2>&1 | tail -15
    echo '```'
    echo
    echo '## Throughput (benchmarks/benchmark_gpu.py)'
    echo
    for batch in 1 16 64; do
        echo '```'
        timeout 150 "$python" benchmarks/benchmark_gpu.py $photos --count 2000 --batch-size "$batch" 2>&1 | tail -3
        echo '```'
    done
} > "$report"
cat "$report"
