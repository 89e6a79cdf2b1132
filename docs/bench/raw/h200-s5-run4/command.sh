#!/usr/bin/env bash
# Session 5, run 4 (1 x H200): the eager 4K-pack cases again with 7 interleaved rounds, D 64 and D 128, against
# both peers (run 3's 3-round medians put D 64 eq1K/4K eager fwd+bwd behind FlexAttention; session 4 had it ahead).
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 400 python3 tools/bench_attention.py --dims 64,128 --packs 4096 --rounds 7 \
  --impls padless,padless@graph,varlen_attn,flex_document,flex_document@graph --out $O/eager4k > $O/eager4k.log 2>&1
cd $O && rm -rf w && tar czf r.tgz * --remove-files
