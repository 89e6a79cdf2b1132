#!/usr/bin/env bash
# Session 5, run 3 (1 x H200): attention GPU tests with the final tuned table (new long/xlong test included), then
# the D 64 table with the peers on 4K/16K packs, 3 interleaved rounds.
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 240 python3 -m pytest -q -m gpu -n 3 tests/kernels/test_attention.py tests/kernels/test_attention_launch.py \
  -p no:cacheprovider > $O/pytest_attention.log 2>&1
timeout 200 python3 tools/bench_attention.py --dims 64 --packs 4096,16384 --rounds 3 \
  --impls padless,padless@graph,varlen_attn,flex_document,flex_document@graph --out $O/d64 > $O/d64.log 2>&1
cd $O && rm -rf w && tar czf r.tgz * --remove-files
