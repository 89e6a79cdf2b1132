#!/usr/bin/env bash
# Run on the lent H200 (device tool): install the carried wheels, then the named stages, each under its own time
# limit, logging everything under $OUT. Usage: bash tools/gpu_run.sh STAGE[:SECONDS] ...
# Stages: env, head-kernels, tests-kernels, tests-train, tests-graph, tests-all, bench-kernels, bench-attention,
# sweep-attention, bench-train (BENCH_TRAIN_SYSTEMS, BENCH_TRAIN_PROFILE, BENCH_TRAIN_SHAPE env), tune-attention,
# bench-rmsnorm-variants, bench-ce-variants, bench-attention-launch, profile-attention-host, train-cli, multi-gpu (2 GPUs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Install the carried wheels once per machine (two gpu_run.sh started side by side, one per GPU, share /tmp/site):
# the first takes a lock and installs, the other waits for it and finds the stamp.
if [ -d .whl ]; then
  want="$(ls .whl | sort | md5sum | cut -c1-32)"
  (
    flock 9
    if [ "$(cat /tmp/site/.padless-wheels 2>/dev/null)" != "$want" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "$want" > /tmp/site/.padless-wheels
    fi
  ) 9>/tmp/padless-wheels.lock
  [ "$(cat /tmp/site/.padless-wheels 2>/dev/null)" = "$want" ] || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/run.log"
run_stage() {
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 60
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
}
for spec in "$@"; do
  stage="${spec%%:*}"; limit="${spec#*:}"; [ "$limit" = "$spec" ] && limit=300
  case "$stage" in
    env) run_stage env "$limit" bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"' ;;
    tests-kernels) run_stage "$stage" "$limit" python3 -m pytest -v --tb=short -m gpu -n "${PYTEST_N:-8}" ${TESTS_KERNELS:-tests/kernels} \
      -p no:cacheprovider ;;
    tests-train) run_stage "$stage" "$limit" python3 -m pytest -v --tb=short -m gpu -n "${PYTEST_N:-8}" tests/train -p no:cacheprovider ;;
    head-kernels) [ -f .device-data/kernels_head.tgz ] && tar xzf .device-data/kernels_head.tgz && echo "kernels/ from HEAD" ;;
    tests-graph) run_stage "$stage" "$limit" python3 -m pytest -v --tb=short -m gpu tests/train/test_cuda_graph.py \
      tests/train/test_static_batch.py -p no:cacheprovider ;;
    tests-all) run_stage "$stage" "$limit" python3 -m pytest -v --tb=short -m gpu tests -p no:cacheprovider ;;
    bench-kernels) run_stage "$stage" "$limit" python3 tools/bench_kernels.py --budget-s $((limit - 10)) --out "$OUT/kernels" \
      ${BENCH_KERNELS_ARGS:-} ;;
    sweep-kernels) run_stage "$stage" "$limit" python3 tools/bench_kernels.py --sweep --out "$OUT/kernels" ;;
    bench-attention) run_stage "$stage" "$limit" python3 tools/bench_attention.py --out "$OUT/attention" \
      ${BENCH_ATTENTION_ARGS:-} ;;
    bench-rmsnorm-variants) run_stage "$stage" "$limit" python3 tools/bench_rmsnorm_variants.py --out "$OUT/rmsnorm" \
      ${BENCH_RMSNORM_ARGS:-} ;;
    bench-ce-variants) run_stage "$stage" "$limit" python3 tools/bench_ce_variants.py --out "$OUT/ce" ;;
    profile-attention-host) run_stage "$stage" "$limit" python3 tools/profile_attention_host.py --out "$OUT/attention-host" \
      ${PROFILE_ATTENTION_ARGS:-} ;;
    bench-attention-launch) run_stage "$stage" "$limit" python3 tools/bench_attention_launch.py --out "$OUT/attention-launch" ;;
    sweep-attention) run_stage "$stage" "$limit" python3 tools/bench_attention.py --sweep --out "$OUT/attention-sweep" ;;
    bench-train) run_stage "$stage" "$limit" python3 tools/bench_train.py --shards "${BENCH_TRAIN_SHARDS:-.device-data/alpaca-qwen3-1024}" \
      --model-shape "${BENCH_TRAIN_SHAPE:-qwen3-8b}" --out "$OUT/train" --profile \
      --profile-systems "${BENCH_TRAIN_PROFILE:-padless-16k}" --time-budget $((limit - 40)) \
      --system-timeout "${BENCH_TRAIN_SYSTEM_TIMEOUT:-240}" ${BENCH_TRAIN_SYSTEMS:+--systems "$BENCH_TRAIN_SYSTEMS"} ${BENCH_TRAIN_ARGS:-} ;;
    tune-attention) run_stage "$stage" "$limit" bash -c "python3 tools/bench_attention.py --sweep --sweep-dims 128 \
      --budget-s 80 --write-tuned kernels/attention_tuned.json --out $OUT/attention && python3 tools/bench_attention.py \
      --dims 128 --packs 4096,16384 --impls padless,padless_det,flex_document,varlen_attn --out $OUT/attention" ;;
    train-cli) run_stage "$stage" "$limit" bash -c 'shape="{\"hidden_size\": 4096, \"num_hidden_layers\": 36, \"num_attention_heads\": 32, \"num_key_value_heads\": 8, \"head_dim\": 128, \"intermediate_size\": 12288, \"vocab_size\": 151936, \"rope_theta\": 1000000.0, \"max_position_embeddings\": 40960, \"tie_word_embeddings\": false}"
      for budget in 1024 16384; do python3 -m train run .device-data/alpaca-qwen3-1024 --family qwen3 \
        --model-overrides "$shape" --tokens-per-micro-batch $budget --checkpointing on --max-steps 12 \
        --output "$OUT/train-cli-$budget" --no-progress || exit 1; python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
        print([(x[\"step\"], round(x[\"loss\"],4), round(x[\"step_time_s\"],3), round(x[\"peak_mem_gib\"],1)) for x in r if \"loss\" in x])" \
        "$OUT/train-cli-$budget/metrics.jsonl"; done' ;;
    multi-gpu) run_stage "$stage" "$limit" bash -c 'tiny="{\"hidden_size\": 256, \"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 64, \"intermediate_size\": 512}"
      common=".device-data/alpaca-qwen3-1024 --family qwen3 --model-overrides $(printf %q "$tiny") --max-steps ${MG_STEPS:-6} --tokens-per-micro-batch 2048 --no-progress --lr 1e-3"
      eval python3 -m train run $common --grad-accum 2 --output "$OUT/mg-single" || exit 1
      eval torchrun --standalone --nproc-per-node 2 -m train run $common --output "$OUT/mg-ddp" || exit 1
      eval torchrun --standalone --nproc-per-node 2 -m train run $common --fsdp --output "$OUT/mg-fsdp" || exit 1
      for r in single ddp fsdp; do python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
        print(sys.argv[2], [round(x[\"loss\"],5) for x in r if \"loss\" in x])" "$OUT/mg-$r/metrics.jsonl" $r; done' ;;
    tests-kernels-fast) run_stage "$stage" "$limit" python3 -m pytest -v --tb=short -m gpu tests/kernels -k "not attention" \
      -p no:cacheprovider ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
# The device tool brings back at most 8 files: everything but the log travels as one archive.
(cd "$OUT" && { tar czf results.tgz --exclude=results.tgz --exclude=run.log . || true; } && find . -mindepth 1 \
  -maxdepth 1 ! -name results.tgz ! -name run.log -exec rm -rf {} +)
