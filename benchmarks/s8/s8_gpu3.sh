#!/bin/bash
# session 8, call 3: layer times of the changed kinds (fastmax's new path, htransformer with 192-slot tiles,
# FMA multilevel on the fused kernel) against cuDNN; fla's autotuning given time (issue 15); the README's
# GPU test command with per-test output (the multilevel fused GPU cases and fastmax compiled included)
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R
keep() { (cd /tmp && tar czf $OUT/r.tgz r); }
timeout 95 python scripts/bench_attention.py --lengths 4096 16384 65536 131072 --series "full (cuDNN): model=full" \
  "fma m=64 p=2: model=fma" "fma multilevel: model=fma model.attention.downsample=multilevel" \
  "htransformer: model=htransformer" "fastmax: model=fastmax" --out $R/causal > $R/causal.log 2>&1; echo "bench rc=$?"
grep -E "^ +[0-9]+ x" $R/causal.log | cut -c1-120; keep
FILES="tests/test_multipole_fused_vs_blocklocal.py tests/test_downsample_fused_vs_cellwise.py tests/test_local_flex_vs_blockwise.py tests/test_reformer_blockwise_vs_naive.py tests/test_compiled_vs_eager.py tests/test_htransformer_blockwise_vs_naive.py tests/test_reformer_flex_vs_blockwise.py tests/test_generate.py tests/test_fastmax_chunk_vs_naive.py"
timeout 220 python -m pytest -v -n 8 -rfE -k gpu $FILES > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "FAILED|ERROR|passed|failed" $R/gpu_tests.log | grep -v "^\[gw" | tail -12 | cut -c1-250
grep -E "FAILED" $R/gpu_tests.log | head -12 | cut -c1-200; grep -c PASSED $R/gpu_tests.log; keep
DUMP_AFTER=110 timeout 120 python ../probe_fla.py 4096 65536 > $R/fla_probe.log 2>&1; echo "fla probe rc=$?"
grep -v "^  File\|^    " $R/fla_probe.log | head -14 | cut -c1-200; keep
