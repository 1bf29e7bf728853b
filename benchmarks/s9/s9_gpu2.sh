#!/bin/bash
# session 9, call 2 (issue 16 item 5): the length-generalisation study's groupedconv point again (call 1 ran out
# of time in its refused evaluations and its checkpoint did not travel), resumed in call 1's folder; the 4K
# masked-LM equal-budget comparison of FMA's bases and the O(n) variant, full attention as the anchor
cd "$(dirname "$0")/src" && export PYTHONPATH=$PWD:$PYTHONPATH
R=/tmp/r; mkdir -p $R; cp -r ../lg $R/length_generalization
keep() { (cd /tmp && tar czf $OUT/r.tgz --exclude='*.ckpt' r); }
timeout 170 python scripts/length_generalization.py --train-length 1024 --factors 1 2 4 8 16 --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 16384 --overrides trainer=gpu logger=csv --gpus 0 0 0 0 --timeout 240 \
  --series model=full "fma avgpool: model=fma model.attention.downsample=avgpool" \
  "fma multilevel: model=fma model.attention.downsample=multilevel" \
  "fma groupedconv: model=fma model.attention.downsample=groupedconv" \
  --out $R/length_generalization > $R/length_generalization.log 2>&1; echo "lengthgen rc=$?"
tail -12 $R/length_generalization.log | cut -c1-160; keep
timeout 330 python scripts/sweep_seq_len.py --lengths 4096 --objective mlm --data text \
  --data-path $PWD/../kernel-docs.txt --stand-in-label "kernel-docs.txt as bytes (stand-in, not enwik8)" \
  --budget-steps 1000 --tokens-per-step 32768 --overrides trainer=gpu logger=csv --gpus 0 0 0 --timeout 240 \
  --series model=full "fma groupedconv: model=fma" \
  "fma multilevel shared: model=fma model.attention.downsample=multilevel" \
  "fma multilevel per_level: model=fma model.attention.downsample=multilevel model.attention.multilevel_maps=per_level" \
  "fma avgpool: model=fma model.attention.downsample=avgpool" \
  "fma O(n) queries: model=fma model.attention.downsample_queries=true" \
  --out $R/mlm_4k > $R/mlm_4k.log 2>&1; echo "mlm rc=$?"
tail -14 $R/mlm_4k.log | cut -c1-200; keep
