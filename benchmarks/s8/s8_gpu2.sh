#!/bin/bash
# session 8, call 2: htransformer on FMA's kernels after the shared-memory fix (GPU test at 16K, layer times);
# issue 16 item 5: the length-generalisation study at 1K on kernel-docs bytes (stand-in); issue 14: paper-size
# train.py side by side at 4K with the tuned tiles
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
mkdir -p $OUT/r
timeout 70 python -m pytest -q -rfE tests/test_htransformer_blockwise_vs_naive.py -k gpu > $OUT/r/htransformer_tests.log 2>&1; echo "htransformer tests rc=$?"
tail -3 $OUT/r/htransformer_tests.log | cut -c1-250
timeout 60 python scripts/bench_attention.py --lengths 4096 16384 65536 131072 --series "full (cuDNN): model=full" \
  "fma m=64 p=2: model=fma" "htransformer: model=htransformer" --out $OUT/r/causal_htransformer > $OUT/r/causal_htransformer.log 2>&1; echo "bench rc=$?"
grep -E "^ +[0-9]+ x" $OUT/r/causal_htransformer.log | cut -c1-120
timeout 270 python scripts/length_generalization.py --train-length 1024 --factors 1 2 4 8 16 --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 16384 --overrides trainer=gpu logger=csv --gpus 0 0 0 \
  --out $OUT/r/length_generalization > $OUT/r/length_generalization.log 2>&1; echo "lengthgen rc=$?"
tail -22 $OUT/r/length_generalization.log | cut -c1-200
find $OUT/r -name "*.ckpt" -delete
timeout 125 python scripts/bench_train.py --series "full: model=full" "fma: model=fma" --lengths 4096 \
  --data $PWD/../wikitext2-test.txt --profile --out $OUT/r/train_paper_4k > $OUT/r/train_paper_4k.log 2>&1; echo "train rc=$?"
grep -A6 "### tokens" $OUT/r/train_paper_4k.log | head -8
for d in $OUT/r/train_paper_4k/points/*; do [ -d $d ] && cp $d/kernel_profile.md $OUT/r/train_paper_4k/$(basename $d).profile.md; done; rm -rf $OUT/r/train_paper_4k/points
cd $OUT && tar czf r.tgz r && rm -rf r
