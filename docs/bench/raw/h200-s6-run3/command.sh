#!/usr/bin/env bash
# Session 6, run 3 (1 x H200): RMSNorm GPU tests (every variant, frozen_c80/_c64 included; the frozen-weight dx is
# now checked bit-identical to the dx computed with dw), then three A/Bs of two_launch_pdl against frozen_c80 and
# frozen_c64 (only the "bwd frozen w" column differs between them).
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 200 python3 -m pytest -q -m gpu -n 3 tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_variants.py \
  -p no:cacheprovider > $O/pytest_rmsnorm.log 2>&1
V=two_launch_pdl,frozen_c80,frozen_c64
for i in 1 2 3; do
  timeout 100 python3 tools/bench_rmsnorm_variants.py --variants $V --out $O/rmsnorm$i > $O/rmsnorm$i.log 2>&1
done
cd $O && rm -rf w && tar czf r.tgz * --remove-files
