#!/usr/bin/env bash
# Session 6, run 1 (1 x H200): RMSNorm GPU tests (every variant, the new pipelined backward included), then the
# A/B of two_launch_pdl against the pipe_* variants (cp.async-pipelined backward), twice.
O=$OUT; R=$PWD; cd $R
OUT=$O/w bash tools/gpu_run.sh env:40 > $O/env.log 2>&1
export PYTHONPATH=$R:/tmp/site
timeout 220 python3 -m pytest -q -m gpu -n 3 tests/kernels/test_rmsnorm.py tests/kernels/test_rmsnorm_variants.py \
  -p no:cacheprovider > $O/pytest_rmsnorm.log 2>&1
V=two_launch_pdl,pipe_s3_w8_e16,pipe_s4_w8_e16,pipe_s4_w16_e16,pipe_s6_w16_e16,pipe_s6_w16_e8,pipe_s8_w16_e8
timeout 170 python3 tools/bench_rmsnorm_variants.py --variants $V --out $O/rmsnorm1 > $O/rmsnorm1.log 2>&1
timeout 150 python3 tools/bench_rmsnorm_variants.py --variants $V --tokens 4096,16384 --out $O/rmsnorm2 > $O/rmsnorm2.log 2>&1
cd $O && rm -rf w && tar czf r.tgz * --remove-files
