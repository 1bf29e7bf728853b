#!/bin/bash
# session 9, call 1: tracebacks of session 8's four failing GPU tests (fastmax compiled, fastmax and reformer
# under CUDA graphs) and the multilevel fused GPU cases after its float32 filters (issues 15, 16); issue 16 item 5:
# the length-generalisation study's remaining four kinds (full, fma avgpool, multilevel, groupedconv) at 1K
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
timeout 100 python -m pytest -v -n 8 --tb=short -rfE -k "gpu and (fastmax or reformer or multilevel)" \
  tests/test_compiled_vs_eager.py tests/test_downsample_fused_vs_cellwise.py tests/test_reformer_flex_vs_blockwise.py \
  tests/test_fastmax_chunk_vs_naive.py tests/test_downsample_multilevel_vs_naive.py > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" $R/gpu_tests.log | tail -12 | cut -c1-250; keep
timeout 380 python scripts/length_generalization.py --train-length 1024 --factors 1 2 4 8 16 --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 16384 --overrides trainer=gpu logger=csv --gpus 0 0 0 0 --timeout 240 \
  --series model=full "fma avgpool: model=fma model.attention.downsample=avgpool" \
  "fma multilevel: model=fma model.attention.downsample=multilevel" \
  "fma groupedconv: model=fma model.attention.downsample=groupedconv" \
  --out $R/length_generalization > $R/length_generalization.log 2>&1; echo "lengthgen rc=$?"
tail -14 $R/length_generalization.log | cut -c1-200; keep
