#!/usr/bin/env bash
# Session 5, run 1 (2 x H200): lane a = GPU tests + dq_first A/B + host timeline; lane b = D 256 sweep (medium,
# long, xlong) in a copy of the tree, then the D 256 table with the new tiles and a profile of eq16K/16K.
O=$OUT; R=$PWD
mkdir -p $O/a $O/b
(export CUDA_VISIBLE_DEVICES=0; cd $R
 OUT=$O/a PYTEST_N=3 bash tools/gpu_run.sh env:40 tests-kernels:240 tests-train:120 > $O/a/stages.log 2>&1
 export PYTHONPATH=$R:/tmp/site
 timeout 150 python3 tools/bench_attention.py --dims 128,256 --packs 4096,16384 --rounds 5 \
   --impls padless@graph,padless_delta_launch@graph --out $O/a/ab > $O/a/ab.log 2>&1
 timeout 60 python3 tools/profile_attention_host.py --out $O/a/host > $O/a/host.log 2>&1) &
(sleep 20; export CUDA_VISIBLE_DEVICES=1
 rm -rf /tmp/laneb && mkdir /tmp/laneb && cp -r $R/kernels $R/tools $R/tests $R/pyproject.toml /tmp/laneb/ && cd /tmp/laneb
 export PYTHONPATH=/tmp/laneb:/tmp/site
 timeout 260 python3 tools/bench_attention.py --sweep --sweep-dims 256 --kinds bwd_kv,bwd_dq --sweep-buckets medium,long,xlong \
   --budget-s 200 --write-tuned kernels/attention_tuned.json --out $O/b/sweep > $O/b/sweep.log 2>&1
 timeout 200 python3 tools/bench_attention.py --dims 256 --packs 16384,65536 --impls padless,varlen_attn \
   --profile eq16K/16K --out $O/b/attention > $O/b/bench.log 2>&1) &
wait
cd $O && tar czf a.tgz a && tar czf b.tgz b && rm -rf a b
