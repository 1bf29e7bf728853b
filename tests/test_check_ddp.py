"""scripts/check_ddp.py's logic without training: the two command lines (DDP, context-parallel), the comparison,
the loss callback. (The check itself, two train.py runs of 2 CPU processes and 1, takes about 45 s: run the
script; tests/test_context_parallel_train.py runs the context-parallel comparison with forked processes.)"""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import check_ddp  # noqa: E402


def run(losses, val, test, weights):
    return {"train_loss": dict(enumerate(losses)), "val_loss": val, "test_loss": test, "weights": weights}


def test_same_global_batch_over_the_ranks():
    one = check_ddp.train_command(devices=1, batch_size=4, steps=6, out=Path("/o"), accelerator="cpu", overrides=[])
    ddp = check_ddp.train_command(devices=2, batch_size=4, steps=6, out=Path("/d"), accelerator="cpu",
                                  overrides=["model=fma"])
    assert "trainer=cpu" in one and "data.batch_size=4" in one
    assert {"trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"} <= set(ddp)
    for command in (one, ddp):
        assert {"model.dropout=0.0", "objective=clm", "trainer.precision=32-true"} <= set(command)
    assert ddp[-1] == "model=fma"
    with pytest.raises(ValueError, match="split evenly"):
        check_ddp.train_command(devices=3, batch_size=4, steps=6, out=Path("/d"), accelerator="cpu", overrides=[])
    with pytest.raises(SystemExit):
        check_ddp.main(["--devices", "2", "objective=mlm"])


def test_context_parallel_runs_hold_the_whole_batch_on_every_rank():
    one = check_ddp.train_command(devices=1, batch_size=4, steps=6, out=Path("/o"), accelerator="cpu",
                                  overrides=["objective=mlm"], context_parallel=True)
    split = check_ddp.train_command(devices=2, batch_size=3, steps=6, out=Path("/d"), accelerator="cpu",
                                    overrides=["model.attention.block_size=8"], context_parallel=True)
    assert {"trainer=cpu", "model=fma", "model.attention.block_size=4", "data.batch_size=4",
            "objective=mlm"} <= set(one)
    assert "objective=clm" not in one and "context_parallel=true" not in one  # an override sets a key once
    assert {"trainer=ddp", "trainer.devices=2", "context_parallel=true", "data.batch_size=3"} <= set(split)
    assert "model.attention.block_size=4" not in split and split[-1] == "model.attention.block_size=8"
    with pytest.raises(SystemExit):
        check_ddp.main(["--context-parallel", "model.dropout=0.1"])


def test_comparison_passes_equal_runs_and_names_what_differs():
    weights = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    one = run([2.5, 2.4], {1: 2.45}, {2: 2.44}, weights)
    rows = check_ddp.compare_runs(one, run([2.5 + 1e-7, 2.4], {1: 2.45}, {2: 2.44}, {k: v.clone() for k, v in
                                  weights.items()}), rtol=1e-5, atol=1e-6)
    assert len(rows) == 5 and all(r["ok"] for r in rows)
    assert "step 0" in check_ddp.report(rows)

    shifted = {"a": weights["a"] + 1e-3, "b": weights["b"]}
    rows = check_ddp.compare_runs(one, run([2.5, 2.41], {1: 2.45}, {}, shifted), rtol=1e-5, atol=1e-6)
    failed = {r["quantity"] for r in rows if not r["ok"]}
    assert failed == {"train_loss step 1", "test_loss step 2", "weights (largest: a)"}
    assert math.isnan(next(r["ddp"] for r in rows if r["quantity"] == "test_loss step 2"))  # missing: fails

    rows = check_ddp.compare_runs(one, run([2.5, 2.4], {1: 2.45}, {2: 2.44}, {"a": weights["a"]}), rtol=1e-5,
                                  atol=1e-6)
    assert not rows[-1]["ok"]  # a weight only one run has


def test_global_loss_callback_records_the_mean_over_ranks(tmp_path):
    callback = check_ddp.GlobalLoss(str(tmp_path / "losses.json"))
    trainer = SimpleNamespace(global_step=1, is_global_zero=True,
                              strategy=SimpleNamespace(reduce=lambda t, reduce_op: t / 2))  # two ranks: sum / 2
    callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(3.0)}, None, 0)
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, None, torch.tensor(5.0), None, 1)
    callback.on_train_end(trainer, None)
    assert json.loads((tmp_path / "losses.json").read_text()) == {"0": 1.5, "1": 2.5}


def test_resume_plan_stops_halfway_and_resumes_on_one_process(tmp_path):
    args = SimpleNamespace(steps=6, devices=2, batch_size=4, out=tmp_path, accelerator="cpu", overrides=["model=fma"],
                           context_parallel=False, trainer="fsdp", resume=True)
    (one, _, first), (ddp, ddp_out, second), (resumed, _, third) = check_ddp.planned_runs(args)
    assert (one, ddp, resumed) == ("one", "ddp", "resumed")
    assert "trainer.max_steps=6" in first and "trainer.max_steps=3" in second and "trainer.max_steps=6" in third
    assert all("optim.total_steps=6" in command for command in (first, second, third))
    assert "trainer=fsdp" in second and "trainer=cpu" in third and "data.batch_size=4" in third
    assert third[-1] == f"ckpt_path={ddp_out}/checkpoints/last.ckpt"
    args.resume = False
    assert [name for name, _, _ in check_ddp.planned_runs(args)] == ["one", "ddp"]
