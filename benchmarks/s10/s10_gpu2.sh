#!/bin/bash
# session 10, call 2: issue 15: the fastmax train.py crash under CUDA graphs (faulthandler), linear's fla GPU tests,
# and the enwik8-style stand-in table on kernel-docs bytes (1,000 steps x 32,768 tokens; resumes in later calls)
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R; [ -d ../enwik8 ] && cp -r ../enwik8 $R/enwik8
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
timeout 100 python -X faulthandler -m pytest -x -q -s -p no:xdist -rfE -k "cuda_graphs and fastmax" \
  tests/test_compiled_vs_eager.py > $R/fastmax_diag.log 2>&1; echo "fastmax diag rc=$?"; grep -E "Fatal|Error|error|passed|failed" $R/fastmax_diag.log | head -8 | cut -c1-200; keep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../whl2/*.whl
timeout 170 python -m pytest -q -p no:xdist -rfE tests/test_linear_fla_vs_chunk.py > $R/fla_tests.log 2>&1; echo "fla tests rc=$?"
tail -3 $R/fla_tests.log | cut -c1-200; keep
timeout 270 python scripts/reproduce_tables.py --table enwik8 --data text --data-path $PWD/../kernel-docs.txt \
  --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" --budget-steps 1000 --tokens-per-step 32768 \
  --overrides trainer=gpu logger=csv --gpus 0 0 0 --timeout 300 --out $R/enwik8 > $R/enwik8_run.log 2>&1; echo "table rc=$?"
grep -E "^\[" $R/enwik8_run.log | cut -c1-160; keep
