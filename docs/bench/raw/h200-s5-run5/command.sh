#!/usr/bin/env bash
# Session 5, run 5 (1 x H200): RMSNorm GPU tests (every variant, the new one-program-per-SM backward included),
# then the A/B of two_launch_pdl against two_launch_pdl_sm1 with the same-traffic elementwise references.
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 200 python3 -m pytest -q -m gpu -n 3 tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_variants.py \
  -p no:cacheprovider > $O/pytest_rmsnorm.log 2>&1
for i in 1 2; do
  timeout 120 python3 tools/bench_rmsnorm_variants.py --variants two_launch_pdl,two_launch_pdl_sm1 \
    --out $O/rmsnorm$i > $O/rmsnorm$i.log 2>&1
done
cd $O && rm -rf w && tar czf r.tgz * --remove-files
