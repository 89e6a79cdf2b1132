#!/usr/bin/env bash
# Session 5, run 2 (1 x H200, serial): D 256 dK/dV sweep (new 2-stage / 128-row candidates) for long and xlong,
# written to the tree's tuned table; the D 256 table with the peers; the D 128 4K-pack table with 3 interleaved
# rounds (eager alpaca/4K against FlexAttention); the CE variants A/B.
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 170 python3 tools/bench_attention.py --sweep --sweep-dims 256 --kinds bwd_kv,bwd_dq --sweep-buckets long,xlong \
  --budget-s 120 --write-tuned kernels/attention_tuned.json --out $O/sweep > $O/sweep.log 2>&1
timeout 230 python3 tools/bench_attention.py --dims 256 --packs 4096,16384,65536 --impls padless,varlen_attn,flex_document \
  --out $O/d256 > $O/d256.log 2>&1
timeout 80 python3 tools/bench_attention.py --dims 128 --packs 4096 --rounds 3 \
  --impls padless,padless@graph,varlen_attn,flex_document,flex_document@graph --out $O/d128 > $O/d128.log 2>&1
timeout 70 python3 tools/bench_ce_variants.py --out $O/ce > $O/ce.log 2>&1
cd $O && rm -rf w && tar czf r.tgz * --remove-files
