#!/usr/bin/env bash
# Two-stage GRPO on verl 0.9.1 (docs/scaling.md): one shared retrieval server + python -m verl.trainer.main_ppo
# with configs/verl/stage{1,2}.yaml (Hydra primary configs over verl's ppo_trainer) and our agent loop.
#
#   scripts/verl_train.sh data STAGE1_FILE STAGE2_FILE   # MCQ files -> data/verl/stage{1,2}.parquet
#   scripts/verl_train.sh 1 [hydra overrides ...]        # stage 1: text MCQs, accuracy + format
#   scripts/verl_train.sh merge                          # stage 1's last FSDP checkpoint -> runs/verl/stage1/merged
#   scripts/verl_train.sh 2 [hydra overrides ...]        # stage 2: image MCQs from the merged stage-1 model
#
# Run it on the Ray head node (after `ray start --head` there and `ray start --address=HEAD:6379` on the others).
# Environment (defaults in brackets):
#   NNODES [1], GPUS_PER_NODE [8]       trainer.nnodes / trainer.n_gpus_per_node
#   MODEL [Qwen/Qwen2.5-VL-7B-Instruct]  stage-1 policy (stage 2 starts from runs/verl/stage1/merged)
#   INDEX [empty: the default KB]       index folder for `medrwr serve retrieval --index`
#   SHARDS [0]                          >0: shard the index over that many Ray Serve replicas (--ray --shards)
#   RETRIEVAL_HOST [this host's address when NNODES>1, else 127.0.0.1], RETRIEVAL_PORT [8321]
#   RETRIEVAL_URL                       an index service that is already running (skips starting one)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
INDEX=${INDEX:-}
SHARDS=${SHARDS:-0}
PORT=${RETRIEVAL_PORT:-8321}
if [ "$NNODES" -gt 1 ]; then
  HOST=${RETRIEVAL_HOST:-$(hostname -I | awk '{print $1}')}
  BIND=0.0.0.0  # other nodes' rollout workers must reach it
else
  HOST=${RETRIEVAL_HOST:-127.0.0.1}
  BIND=127.0.0.1
fi
URL=${RETRIEVAL_URL:-http://$HOST:$PORT}
mkdir -p runs/verl data/verl

usage() { sed -n '2,17p' "$0" >&2; exit 2; }

start_retrieval() {
  if curl -sf "$URL/healthz" >/dev/null 2>&1; then
    echo "retrieval service already up at $URL"
    return
  fi
  [ -n "${RETRIEVAL_URL:-}" ] && { echo "RETRIEVAL_URL=$RETRIEVAL_URL does not answer /healthz" >&2; exit 1; }
  local args=(serve retrieval --host "$BIND" --port "$PORT")
  [ -n "$INDEX" ] && args+=(--index "$INDEX")
  [ "$SHARDS" -gt 0 ] && args+=(--ray --shards "$SHARDS")
  echo "starting: medrwr ${args[*]} (log: runs/verl/retrieval.log)"
  medrwr "${args[@]}" >runs/verl/retrieval.log 2>&1 &
  RETRIEVAL_PID=$!
  trap 'kill "$RETRIEVAL_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 900); do
    curl -sf "$URL/healthz" >/dev/null 2>&1 && { echo "retrieval service ready at $URL"; return; }
    kill -0 "$RETRIEVAL_PID" 2>/dev/null || break
    sleep 1
  done
  echo "the retrieval service did not start; see runs/verl/retrieval.log" >&2
  exit 1
}

train_stage() {
  local stage=$1; shift
  local model=$MODEL sets="\"retrieval.url=$URL\""
  if [ "$stage" = 2 ]; then
    model=$ROOT/runs/verl/stage1/merged
    [ -f "$model/config.json" ] || { echo "no merged stage-1 model at $model: run '$0 merge' first" >&2; exit 1; }
    sets="$sets,\"rewards.confidence_weight=0\""  # not computable in verl's reward workers (docs/scaling.md)
  fi
  [ -f "data/verl/stage$stage.parquet" ] || { echo "no data/verl/stage$stage.parquet: run '$0 data ...' first" >&2; exit 1; }
  start_retrieval
  # Absolute paths: Ray workers on other nodes do not start in this directory.
  python -m verl.trainer.main_ppo \
    --config-path="$ROOT/configs/verl" --config-name="stage$stage" \
    medrwr.config="$ROOT/configs/stage$stage.yaml" \
    "medrwr.overrides=[$sets]" \
    data.train_files="$ROOT/data/verl/stage$stage.parquet" \
    data.val_files="$ROOT/data/verl/stage$stage.parquet" \
    actor_rollout_ref.model.path="$model" \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$ROOT/configs/verl/agent_loops.yaml" \
    trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS_PER_NODE" \
    trainer.default_local_dir="$ROOT/runs/verl/stage$stage" \
    "$@"
}

case "${1:-}" in
  data)
    [ $# -eq 3 ] || usage
    medrwr train verl-data "$2" data/verl/stage1.parquet --split train
    medrwr train verl-data "$3" data/verl/stage2.parquet --split train
    ;;
  1|2)
    stage=$1; shift
    train_stage "$stage" "$@"
    ;;
  merge)
    step=$(cat runs/verl/stage1/latest_checkpointed_iteration.txt)
    python -m verl.model_merger merge --backend fsdp \
      --local_dir "runs/verl/stage1/global_step_$step/actor" --target_dir runs/verl/stage1/merged
    ;;
  *) usage ;;
esac
