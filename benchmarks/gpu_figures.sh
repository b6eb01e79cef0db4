#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go, on a machine with one CUDA GPU, from the repository root:
#
#   bash benchmarks/gpu_figures.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else /tmp/sam3-gpu
#
# Builds the full-size random-weight checkpoint (facebook/sam3's configuration: its masks are meaningless, its
# compute is the real model's), then, most important first, each step's log in OUT_DIR:
#   core-*     the model replica's work in one process (benchmarks.core_throughput, bf16, text prompts,
#              distinct 640x480 images): one at a time and in batches of 8, with a profile of one batch;
#   app-*      the application uncompiled (benchmarks.compare --compile off): transformers' pipeline, our core and the service
#              over HTTP at concurrency 1, 8, 32, with many instances per answer (the random weights keep
#              ~150; with the bytes per hop and an autoscaling row) and with at most 8 (max_instances);
#   parity-device  masks finished on the GPU against the same outputs finished on the CPU;
#   parity-bf16  how far bf16 moves masks, scores and boxes from float32 (benchmarks.bf16_parity);
#   autocast-core  the core with float32 weights under bf16 autocast (the more accurate bf16, how fast);
#   compiled-*  the core and the application with the layers compiled (`compile: true`), beside the core-*
#              and app-* rows above; batches of 16 against 8 (core, and the application's max_batch_size) with a
#              profile of the compiled batch and Serve's bare floor; then each model replica's start (load,
#              warm-up and compile) from its log; compiled-vision-app compiles the ViT's layers alone;
#   video      video tracking (benchmarks.video, bf16): the service over HTTP against transformers' own loop,
#              300 frames of 640x480, concepts and two clicked objects.
# STEPS (default "core app parity") chooses the groups or steps to run; STEP_TIMEOUT (seconds, default 300) bounds each
# step, so one that hangs leaves time for the rest.
set -uo pipefail
out=${1:-${OUT:-/tmp/sam3-gpu}}
checkpoint=${SAM3_FULL_CHECKPOINT:-/tmp/sam3-full}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {
  local name=$1
  shift
  local steps=" ${STEPS:-core app parity} "
  if [ "$name" != checkpoint ] && [[ $steps != *" $name "* && $steps != *" ${name%%-*} "* ]]; then return 0; fi
  echo "== $name: $*"
  timeout "${STEP_TIMEOUT:-300}" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s"
  grep -v -e '^Loading weights' -e '^\s*$' "$out/$name.log" | tail -n "${SHOW_LINES:-40}"
}

nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader
[ -f "$checkpoint/model.safetensors" ] || step checkpoint python -m tools.tiny_checkpoint "$checkpoint" --preset full
core=(python -m benchmarks.core_throughput --checkpoint "$checkpoint" --device cuda --dtype bfloat16 --prompts text --requests 32)
SHOW_LINES=30 step core-many "${core[@]}" --profile
SHOW_LINES=8 step core-few "${core[@]}" --max-instances 8
app=(python -m benchmarks.compare --checkpoint "$checkpoint" --device cuda --dtype bfloat16 --concurrency 1,8,32
     --requests 64 --markdown)
step app-many "${app[@]}" --only inprocess,bytes,http --configurations batched,autoscaling --autoscale-load-s 20 --compile off
step app-few "${app[@]}" --only inprocess,http --configurations batched --max-instances 8 --compile off
SHOW_LINES=3 step parity-device python -m benchmarks.device_parity --checkpoint "$checkpoint"
step parity-bf16 python -m benchmarks.bf16_parity --checkpoint "$checkpoint" --device cuda
SHOW_LINES=8 step autocast-core python -m benchmarks.core_throughput --checkpoint "$checkpoint" --device cuda \
  --dtype float32 --autocast --prompts text --requests 16
SHOW_LINES=10 step compiled-core-few "${core[@]}" --max-instances 8 --compile all
SHOW_LINES=10 step compiled-core-vision "${core[@]}" --max-instances 8 --compile vision
step compiled-app-few "${app[@]}" --only inprocess,http --configurations batched --max-instances 8 --compile on
step compiled-app-many "${app[@]}" --only inprocess,http --configurations batched,autoscaling --autoscale-load-s 20 --compile on
SHOW_LINES=40 step compiled-core-batches "${core[@]}" --max-instances 8 --compile all --batch-size 16,8 --profile
step compiled-app-batches "${app[@]}" --only http,floor --configurations batched --max-instances 8 --compile on \
  --max-batch-size 8,16 --concurrency 1,32 --requests 96
step compiled-vision-app "${app[@]}" --only http --configurations batched --max-instances 8 --compile on \
  --compile-regions vision --max-batch-size 8,16 --concurrency 1,32 --requests 160
SHOW_LINES=10 step compiled-starts grep -rh "ready in" /tmp/ray/ --include="*Sam3ModelPool*"
SHOW_LINES=10 step compiled-core-many "${core[@]}" --compile all
STEP_TIMEOUT=${STEP_TIMEOUT:-600} SHOW_LINES=12 step video python -m benchmarks.video --checkpoint "$checkpoint" \
  --device cuda --frames 300 --width 640 --height 480 --markdown
