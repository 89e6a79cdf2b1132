#!/usr/bin/env bash
# The README's main job on a fresh clone, CPU only (the set-up needs a package index; the job itself no network):
# set up .venv, pack the bundled demo dataset with the bundled demo tokenizer, show what the shards hold, then
# fully fine-tune a tiny randomly initialised model on them and show the loss falling. Outputs land in ./demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
prep pack demo:alpaca --max-len 512 --eval-fraction 0.05 --out demo-out/shards --overwrite
prep stats demo-out/shards --model-params 8e9 --gpu h200
prep show demo-out/shards --pack 0 | head -n 40
prep verify demo-out/shards
# A randomly initialised tiny model learns little through LoRA alone, so the demo fine-tunes all of it (--full);
# drop --full to see the LoRA path (the default for real models).
train run demo-out/shards --output demo-out/run --overwrite --full --max-steps 300 --eval-every 100 --lr 2e-3 --log-every 25 "$@"
