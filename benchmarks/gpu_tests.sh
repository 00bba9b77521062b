#!/usr/bin/env bash
# The test suite on a GPU machine, where accelerator "auto" picks CUDA and bf16-mixed.
# CI has no GPU, so this is run by hand on a lent one (BENCHMARKS.md, "The test suite on
# the H100"). It uses the machine's own torch, Lightning and timm, our code from src/, and
# wheels in .whl/ for what that machine lacks, fetched beforehand where pip can download:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
#     manylinux_2_28_x86_64 -d .whl kagglehub pydicom ImageHash ... (pins: constraints.txt)
#   pip wheel --no-deps -w .whl grad-cam   (published as a source archive only)
#
#   bash benchmarks/gpu_tests.sh [SECONDS] [PYTEST ARGS...]   (default: the whole suite)
set -u -o pipefail  # the exit status is pytest's, not tail's
# One GPU: with several, accelerator "auto" trains with DDP and Lightning would start the
# whole pytest run again in every other process.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python=$(command -v python3)  # the tests run `cxr` from beside their interpreter
printf '#!%s\nfrom cxrkit.cli import app\napp()\n' "$python" > "$(dirname "$python")/cxr"
chmod +x "$(dirname "$python")/cxr"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
seconds=${1:-420}; shift
# The browser test needs Chromium, absent there; lite1/lite2 weights are not carried.
timeout "$seconds" python3 -m pytest -q -p no:cacheprovider --timeout 240 -ra \
  --ignore tests/test_browser.py -k "not lite1 and not lite2" "${@:-tests}" 2>&1 \
  | tee "${OUT:-.}/pytest.log" | tail -40
