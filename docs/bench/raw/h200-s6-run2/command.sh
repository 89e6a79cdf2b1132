#!/usr/bin/env bash
# Session 6, run 2 (1 x H200): RMSNorm GPU tests (every variant, resident_r96/_r112 included), the A/B of
# two_launch_pdl against two_launch_pdl_balanced and the resident-reducer variants (twice), then a profiler
# breakdown (backward kernel, gap, reduction kernel) of one 4K backward per variant.
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 200 python3 -m pytest -q -m gpu -n 3 tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_variants.py \
  -p no:cacheprovider > $O/pytest_rmsnorm.log 2>&1
V=two_launch_pdl,two_launch_pdl_balanced,resident_r96,resident_r112
for i in 1 2 3; do
  timeout 100 python3 tools/bench_rmsnorm_variants.py --variants $V --out $O/rmsnorm$i > $O/rmsnorm$i.log 2>&1
done
timeout 100 python3 .device-data/s6prof.py $V > $O/profile.log 2>&1
cd $O && rm -rf w && tar czf r.tgz * --remove-files
