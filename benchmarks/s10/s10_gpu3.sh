#!/bin/bash
# session 10, call 3: the fastmax crash's source (CUDA graphs) and whether compile=true without graphs runs;
# the failing fla GPU test's traceback; issue 14: paper-size train.py side by side at 4K (full on cuDNN, fma)
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
timeout 70 python -X faulthandler -m pytest -x -q -s -p no:xdist -k "cuda_graphs and fastmax" \
  tests/test_compiled_vs_eager.py > $R/fastmax_graphs.log 2>&1; echo "fastmax graphs rc=$?"
loc=$(grep -oE '/tmp/torchinductor_root/[^"]+\.py", line [0-9]+' $R/fastmax_graphs.log | head -1)
f=${loc%%\"*}; l=${loc##* }; [ -n "$f" ] && cp "$f" $R/fastmax_crashing_graph.py && sed -n "$((l-25)),$((l+2))p" "$f" | cut -c1-220
keep
timeout 60 python train.py trainer=gpu trainer.max_steps=6 trainer.val_check_interval=3 trainer.enable_progress_bar=false \
  model=fastmax model.attention.chunk_size=16 model.dim=64 model.depth=1 model.num_heads=2 model.dropout=0.0 \
  data.seq_len=256 data.batch_size=4 optim.warmup_steps=2 test=false compile=true logger=csv paths.output_dir=/tmp/fm_true \
  > $R/fastmax_compile_true.log 2>&1; echo "fastmax compile=true rc=$?"; tail -2 $R/fastmax_compile_true.log | cut -c1-200; keep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../whl2/*.whl
timeout 130 python -m pytest -x -v -p no:xdist --tb=short -k "float64" tests/test_linear_fla_vs_chunk.py > $R/fla_float64.log 2>&1
echo "fla float64 rc=$?"; grep -E "PASSED|FAILED|Error|assert" $R/fla_float64.log | head -12 | cut -c1-200; keep
timeout 150 python scripts/bench_train.py --series "full: model=full" "fma: model=fma" --lengths 4096 \
  --data $PWD/../wikitext2-test.txt --profile --out $R/train_paper_4k > $R/train_paper_4k.log 2>&1; echo "train rc=$?"
grep -A6 "### tokens" $R/train_paper_4k.log | head -8
for d in $R/train_paper_4k/points/*; do [ -d $d ] && cp $d/kernel_profile.md $R/train_paper_4k/$(basename $d).profile.md; done; keep
