#!/bin/bash
# session 9, call 3: the 4K masked-LM comparison's last two points (avgpool, the O(n) variant; issue 16), resumed
# in call 2's folder; tracebacks of the fastmax/reformer GPU tests that failed or did not finish in session 8
# (issue 15); linear on fla's kernels: layer times against the torch path and FMA, and its GPU tests
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R; cp -r ../mlm $R/mlm_4k
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
timeout 170 python scripts/sweep_seq_len.py --lengths 4096 --objective mlm --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 32768 --overrides trainer=gpu logger=csv --gpus 0 0 --timeout 240 \
  --series model=full "fma groupedconv: model=fma" \
  "fma multilevel shared: model=fma model.attention.downsample=multilevel" \
  "fma multilevel per_level: model=fma model.attention.downsample=multilevel model.attention.multilevel_maps=per_level" \
  "fma avgpool: model=fma model.attention.downsample=avgpool" \
  "fma O(n) queries: model=fma model.attention.downsample_queries=true" \
  --out $R/mlm_4k > $R/mlm_4k.log 2>&1; echo "mlm rc=$?"
tail -12 $R/mlm_4k.log | cut -c1-200; keep
timeout 150 python -m pytest -v -n 7 --tb=short -rfE -k "gpu and (fastmax or reformer)" tests/test_compiled_vs_eager.py \
  tests/test_reformer_flex_vs_blockwise.py::test_gpu_reformer_flex_memory_stays_linear > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" $R/gpu_tests.log | tail -8 | cut -c1-250; keep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../whl2/*.whl
export TRITON_CACHE_AUTOTUNING=1
timeout 130 python scripts/bench_attention.py --lengths 4096 16384 65536 131072 --series "fma m=64 p=2: model=fma" \
  "linear (torch): model=linear" "linear (fla): model=linear model.attention.backend=fla" --out $R/linear_fla > $R/linear_fla.log 2>&1; echo "bench rc=$?"
grep -E "^ +[0-9]+ x" $R/linear_fla.log | cut -c1-120; keep
timeout 100 python -m pytest -v -n 2 --tb=short -rfE -k gpu tests/test_linear_fla_vs_chunk.py > $R/fla_tests.log 2>&1; echo "fla tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" $R/fla_tests.log | tail -6 | cut -c1-250; keep
