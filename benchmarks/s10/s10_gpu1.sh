#!/bin/bash
# Plan for session 10's first device call (copy to .device_data/, carry .device_data and .whl; data: kernel-docs.txt,
# the mlm folder from results/mlm_4k_kernel_docs without checkpoints as .device_data/mlm; fla wheels in .device_data/whl2)
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R; cp -r ../mlm $R/mlm_4k
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
# 1. issue 16: the O(n) variant's point (resumes; ~100 s)
timeout 200 python scripts/sweep_seq_len.py --lengths 4096 --objective mlm --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 32768 --overrides trainer=gpu logger=csv --gpus 0 0 --timeout 240 \
  --series model=full "fma groupedconv: model=fma" \
  "fma multilevel shared: model=fma model.attention.downsample=multilevel" \
  "fma multilevel per_level: model=fma model.attention.downsample=multilevel model.attention.multilevel_maps=per_level" \
  "fma avgpool: model=fma model.attention.downsample=avgpool" \
  "fma O(n) queries: model=fma model.attention.downsample_queries=true" \
  --out $R/mlm_4k > $R/mlm_4k.log 2>&1; echo "mlm rc=$?"; tail -4 $R/mlm_4k.log; keep
# 2. issue 15: the changed fastmax / reformer compile paths
timeout 160 python -m pytest -v -n 7 --tb=short -rfE -k "gpu and (fastmax or reformer)" tests/test_compiled_vs_eager.py \
  > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" $R/gpu_tests.log | tail -6; keep
# 3. linear fla after the chunked denominator (one process: the bench autotunes once)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../whl2/*.whl
timeout 140 python scripts/bench_attention.py --lengths 4096 16384 65536 131072 --series "fma m=64 p=2: model=fma" \
  "linear (torch): model=linear" "linear (fla): model=linear model.attention.backend=fla" --out $R/linear_fla > $R/linear_fla.log 2>&1
grep -E "^ +[0-9]+ x" $R/linear_fla.log; keep
