#!/bin/bash
# session 8, call 1: the README's GPU test command in one call (-n 8); why fla does not finish (issue 15);
# one layer per kind, causal and bidirectional, 4K-128K (issue 15's layer targets, issue 14's layer table vs cuDNN)
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/r/gpu.txt 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/r/gpu.txt
FILES="tests/test_multipole_fused_vs_blocklocal.py tests/test_downsample_fused_vs_cellwise.py tests/test_local_flex_vs_blockwise.py tests/test_reformer_blockwise_vs_naive.py tests/test_compiled_vs_eager.py tests/test_htransformer_blockwise_vs_naive.py tests/test_reformer_flex_vs_blockwise.py tests/test_generate.py"
timeout 230 python -m pytest -q -n 8 -rfE $FILES > $OUT/r/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "passed|failed|FAILED|ERROR" $OUT/r/gpu_tests.log | tail -12 | cut -c1-250
DUMP_AFTER=45 timeout 70 python ../probe_fla.py 4096 65536 > $OUT/r/fla_probe.log 2>&1; echo "fla probe rc=$?"
grep -v "^  File\|^    " $OUT/r/fla_probe.log | head -20 | cut -c1-200
L="4096 16384 65536 131072"
timeout 150 python scripts/bench_attention.py --lengths $L --series "full (cuDNN): model=full" "fma m=64 p=2: model=fma" \
  "local w=128: model=local" "linear: model=linear" "htransformer: model=htransformer" "reformer: model=reformer" \
  "fastmax: model=fastmax" --out $OUT/r/causal > $OUT/r/causal.log 2>&1; echo "causal rc=$?"
grep -E "^ +[0-9]+ x" $OUT/r/causal.log | cut -c1-120
timeout 95 python scripts/bench_attention.py --bidirectional --lengths $L --series "full (cuDNN): model=full" "fma m=64 p=2: model=fma" \
  "local w=128: model=local" "nystromformer: model=nystromformer" "linformer: model=linformer" --out $OUT/r/bidi > $OUT/r/bidi.log 2>&1; echo "bidi rc=$?"
grep -E "^ +[0-9]+ x" $OUT/r/bidi.log | cut -c1-120
cd $OUT && tar czf r.tgz r && rm -rf r
