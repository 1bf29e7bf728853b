"""train.py end to end on the real configs: composition, tiny runs, result.json, resume (exact, after a signal,
extending, refused checkpoints), sweeps, bad input."""

import argparse
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import fma
import models
from conftest import ROOT, SHARED_DATA, TINY, compose_config, logged, read_metrics, run_train_cli
from fma import ConfigurationError
from train import SKIP_THROUGHPUT_STEPS, build_loggers, train

GROUP_OPTIONS = {group: sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml") if not p.stem.startswith("_"))
                 for group in ("model", "data", "objective", "trainer", "logger", "experiment")}


def test_every_model_data_objective_combination_composes(tmp_path):
    assert {"full", "fma"} <= set(GROUP_OPTIONS["model"])
    assert set(GROUP_OPTIONS["data"]) == {"enwik8", "synthetic", "text", "wikitext103"}
    for model in GROUP_OPTIONS["model"]:
        for data in GROUP_OPTIONS["data"]:
            for objective in GROUP_OPTIONS["objective"]:
                cfg = compose_config(tmp_path, [f"model={model}", f"data={data}", f"objective={objective}",
                                                "data.path=/unused"] if data != "synthetic" else
                                     [f"model={model}", f"data={data}", f"objective={objective}"], tiny=False)
                assert cfg.model.attention.name == model
                assert hydra.utils.get_class(cfg.data._target_).__name__.lower().startswith(data[:4])
                objective_fn = hydra.utils.instantiate(cfg.objective)
                if objective_fn.causal and not fma.ATTENTION_KINDS[model].has_causal_form:
                    with pytest.raises(Exception, match="objective=mlm"):  # Hydra wraps the ConfigurationError
                        hydra.utils.instantiate(cfg.model, vocab_size=256, causal=True, _convert_="all")
                    continue
                net = hydra.utils.instantiate(cfg.model, vocab_size=256, causal=objective_fn.causal, _convert_="all")
                assert net(torch.randint(256, (1, 8))).shape == (1, 8, 256)


@pytest.mark.parametrize("group", ["trainer", "logger", "experiment"])
def test_other_groups_compose(tmp_path, group):
    for option in GROUP_OPTIONS[group]:
        cfg = compose_config(tmp_path, [f"{group}={option}", "data.path=/unused"] if group == "experiment"
                             else [f"{group}={option}"], tiny=False)
        if group == "logger":
            for logger_cfg in cfg.logger.values():
                hydra.utils.get_class(logger_cfg._target_)
        if group == "trainer":
            assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
        if group == "experiment":   # every value it sets lands at the root, its group choices too
            experiment = OmegaConf.load(ROOT / "configs" / group / f"{option}.yaml")
            choices = experiment.pop("defaults")
            own = {**dict(flat_items(experiment)), "data.path": "/unused"}   # and this test's override
            for key, value in own.items():
                assert OmegaConf.select(cfg, key) == value, key
            for choice in choices:
                (key, name), = choice.items()
                chosen_group = key.removeprefix("override /")
                chosen = OmegaConf.load(ROOT / "configs" / chosen_group / f"{name}.yaml")
                chosen.pop("defaults", None)
                for leaf, value in flat_items(chosen, f"{chosen_group}."):
                    if leaf not in own and not str(value).startswith("${"):
                        assert OmegaConf.select(cfg, leaf) == value, (choice, leaf)


def flat_items(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config, interpolations unresolved."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    for key, value in node.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny causal-LM run: (config, results, run folder)."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    cfg = compose_config(tmp_path, [])
    return cfg, train(cfg), tmp_path / "run"


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tiny_run_writes_metrics_and_checkpoints(tmp_path, tiny_run, objective):
    if objective == "clm":
        cfg, results, run_dir = tiny_run
    else:
        cfg = compose_config(tmp_path, ["objective=mlm"])
        results, run_dir = train(cfg), tmp_path / "run"
    rows = read_metrics(run_dir)
    losses = logged(rows, "train/loss")
    assert sorted(losses) == list(range(6)) and all(math.isfinite(v) for v in losses.values())
    val = logged(rows, "val/ppl")
    assert len(val) == 2 and all(v > 1 for v in val.values())    # validated at steps 3 and 6
    assert math.isfinite(results["test/ppl"]) and results["test/ppl"] > 1
    assert results["val/ppl"] == pytest.approx(math.exp(results["val/loss"]), rel=1e-5)
    assert logged(rows, "train/tokens_per_s") and logged(rows, "train/peak_mem_gib")
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 6 if name == "last.ckpt" else checkpoint["global_step"] in (3, 6)
        assert checkpoint["hyper_parameters"]["config"]["objective"]["_target_"].endswith(
            "CausalLM" if objective == "clm" else "MaskedLM")


def test_result_json_of_a_finished_run(tiny_run):
    """Status, the final metrics (those train returns, the last of each in csv/metrics.csv), parameters
    counted by hand, tokens/s and memory by the rule over the logged steps, steps, the resolved config."""
    cfg, results, run_dir = tiny_run
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["reason"], result["steps"]) == ("ok", "", 6)
    rows = read_metrics(run_dir)
    last = {key: float(row[key]) for row in rows for key in row if key.startswith(("val/", "test/")) and row[key]}
    assert result["metrics"] == last == results and set(last) == {f"{s}/{m}" for s in ("val", "test")
                                                                  for m in ("loss", "ppl", "acc")}
    # d = 32, one block, vocabulary 16 + the mask token: embedding 17 d (tied head); attention q, k, v, out
    # without bias 4 d^2; two LayerNorms 2 * 2d; MLP d x 4d + 4d and 4d x d + d; the final LayerNorm 2d
    embedding, attention = 17 * 32, 4 * 32 * 32
    non_embedding = attention + 4 * 32 + (32 * 128 + 128) + (128 * 32 + 32) + 2 * 32
    assert result["parameters"] == {"total": embedding + non_embedding, "attention": attention,
                                    "non_embedding": non_embedding}
    throughput = [float(row["train/tokens_per_s"]) for row in rows if row["train/tokens_per_s"]]
    assert len(throughput) == 5   # steps 1..5: the first step has no previous one to time from
    assert result["tokens_per_s"] == statistics.median(throughput[min(SKIP_THROUGHPUT_STEPS, 5 // 2):])
    assert result["peak_mem_gib"] == max(float(row["train/peak_mem_gib"]) for row in rows if row["train/peak_mem_gib"])
    assert result["config"] == OmegaConf.to_container(cfg, resolve=True)
    assert 0 < result["wall_s"] and result["started"] <= result["finished"]


@pytest.mark.parametrize("error, status, reason", [
    (RuntimeError("boom\nmore detail"), "failed", "RuntimeError: boom"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom",
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    (KeyboardInterrupt(), "interrupted", "KeyboardInterrupt"),
])
def test_result_json_of_a_run_that_fails(tmp_path, monkeypatch, error, status, reason):
    """An error after step 4 (validated at step 3): result.json says how and how far, with what was
    logged until then, and the error goes on (Lightning turns Ctrl-C during fit into SystemExit)."""
    def fail_after_step_4(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 4:
            raise error

    monkeypatch.setattr(models.LanguageModelModule, "on_train_batch_end", fail_after_step_4, raising=False)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if isinstance(error, KeyboardInterrupt) else type(error)):
            train(compose_config(tmp_path, []))
    finally:
        signal.signal(signal.SIGINT, sigint)   # Lightning ignores further Ctrl-C after the first
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["status"], result["reason"], result["steps"]) == (status, reason, 4)
    rows = read_metrics(tmp_path / "run")
    assert result["metrics"] == {key: float(row[key]) for row in rows for key in row if key.startswith("val/") and row[key]}
    throughput = [float(row["train/tokens_per_s"]) for row in rows if row["train/tokens_per_s"]]
    # timed from the second batch; the fourth raised before its values were logged; the rule skips min(3, 2 // 2)
    assert len(throughput) == 2 and result["tokens_per_s"] == throughput[1]
    assert result["parameters"]["total"] > 0


def test_chunked_loss_trains_like_the_whole_one(tmp_path, tiny_run):
    """loss_chunk_tokens=10 (not a divisor of the 128 tokens per step) through train.py: the same
    training losses and metrics as the tiny run, to float32 rounding."""
    _, results, run_dir = tiny_run
    chunked = train(compose_config(tmp_path, ["loss_chunk_tokens=10"]))
    expected, got = logged(read_metrics(run_dir), "train/loss"), logged(read_metrics(tmp_path / "run"), "train/loss")
    assert sorted(got) == sorted(expected)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in expected)
    assert all(chunked[key] == pytest.approx(results[key], rel=1e-4) for key in results)


@pytest.mark.parametrize("kind, mode", [("full", "true"), ("fma", "reduce-overhead")])
def test_compiled_run_trains_like_the_eager_one(tmp_path, kind, mode):
    """compile=true and compile=reduce-overhead through train.py (on the CPU there are no CUDA graphs,
    the wiring is the same): the training losses of the eager run, to float32 rounding. Dropout off:
    compiled dropout draws other random numbers."""
    model = [f"model={kind}", "model.dropout=0.0"] + (["model.attention.block_size=8"] if kind == "fma" else [])
    train(compose_config(tmp_path / "eager", model))
    train(compose_config(tmp_path / "compiled", [*model, f"compile={mode}"]))
    torch._dynamo.reset()  # the next in-process compile starts afresh
    expected, got = (logged(read_metrics(tmp_path / name / "run"), "train/loss") for name in ("eager", "compiled"))
    assert sorted(got) == sorted(expected)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in expected)


@pytest.mark.parametrize("compile, trainer, cuda, expected", [
    ("auto", {"accelerator": "gpu", "devices": 1}, True, "reduce-overhead"),
    ("auto", {"accelerator": "auto", "devices": [3]}, True, "reduce-overhead"),
    ("auto", {"accelerator": "auto", "devices": 1}, False, False),
    ("auto", {"accelerator": "cpu", "devices": 1}, True, False),
    ("auto", {"accelerator": "gpu", "devices": 2}, True, False),
    ("auto", {"accelerator": "gpu", "devices": 1, "num_nodes": 2}, True, False),
    (True, {"accelerator": "cpu", "devices": 1}, False, True),
    (False, {"accelerator": "gpu", "devices": 1}, True, False),
])
def test_compile_auto_is_cuda_graphs_on_one_gpu_only(monkeypatch, compile, trainer, cuda, expected):
    from train import compile_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = OmegaConf.create({"compile": compile, "model": {"attention": {"name": "fma"}}})
    assert compile_mode(cfg, OmegaConf.create(trainer)) == expected


@pytest.mark.parametrize("compile, expected", [("auto", False), ("reduce-overhead", "reduce-overhead"), (True, True)])
def test_compile_auto_trains_the_kinds_known_to_fail_under_cuda_graphs_eager(monkeypatch, compile, expected):
    from train import compile_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = OmegaConf.create({"compile": compile, "model": {"attention": {"name": "fastmax"}}})
    assert compile_mode(cfg, OmegaConf.create({"accelerator": "gpu", "devices": 1})) == expected


def test_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="compile=reduce-overhead"):
        train(compose_config(tmp_path, ["compile=fast"]))


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, objective):
    """Resume at step 4 of 8: steps 4..7 log exactly the losses of the uninterrupted run (dropout on,
    random masks for MLM), because weights, optimizer, schedule, RNG and data position are restored."""
    step_checkpoint = ["+callbacks.every_4._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                       f"+callbacks.every_4.dirpath={tmp_path / 'steps'}", "+callbacks.every_4.every_n_train_steps=4",
                       "+callbacks.every_4.save_top_k=-1", "+callbacks.every_4.filename='{step}'"]
    common = [f"objective={objective}", "trainer.max_steps=8", "trainer.val_check_interval=5", "model.dropout=0.1"]
    train(compose_config(tmp_path / "a", [*common, *step_checkpoint]))
    uninterrupted = logged(read_metrics(tmp_path / "a" / "run"), "train/loss")
    resume_from = tmp_path / "steps" / "step=4.ckpt"
    assert resume_from.exists()
    train(compose_config(tmp_path / "b", [*common, f"ckpt_path='{resume_from}'"]))
    resumed = logged(read_metrics(tmp_path / "b" / "run"), "train/loss")
    assert sorted(resumed) == [4, 5, 6, 7]
    assert resumed == {step: uninterrupted[step] for step in resumed}


def test_a_finished_run_extends_only_on_its_own_schedule(tmp_path):
    """Resuming a finished 6-step run (validated at its last step) with trainer.max_steps=12 is refused:
    the cosine schedule would be rebuilt for 12 steps and the LR jump. optim.total_steps=6, which the
    message names, extends it exactly: steps 6..11 are logged (not 7..12), in epoch 0, with the losses
    of a straight 12-step run on that schedule."""
    train(compose_config(tmp_path / "a", ["test=false"]))   # TINY: 6 steps, validation at 3 and 6
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    refusal = r"optim.total_steps: 6 in the checkpoint, 12 here.*optim.total_steps=6"
    with pytest.raises(ConfigurationError, match=refusal):
        train(compose_config(tmp_path / "refused", ["test=false", "trainer.max_steps=12", f"ckpt_path={last}"]))
    longer = ["test=false", "trainer.max_steps=12", "optim.total_steps=6"]
    train(compose_config(tmp_path / "b", [*longer, f"ckpt_path={last}"]))
    train(compose_config(tmp_path / "c", longer))
    rows = read_metrics(tmp_path / "b" / "run")
    extended, straight = logged(rows, "train/loss"), logged(read_metrics(tmp_path / "c" / "run"), "train/loss")
    assert sorted(extended) == list(range(6, 12))
    assert {row["epoch"] for row in rows if row["train/loss"]} == {"0"}
    assert extended == {step: straight[step] for step in extended}


def test_checkpoint_of_another_attention_is_refused_unless_allowed(tmp_path, tiny_run):
    """A `full` checkpoint has the shapes of `local`; resuming it under model=local is refused, naming
    both, unless allow_other_attention=true. Another backend computes the same attention: allowed."""
    _, _, run_dir = tiny_run
    last = run_dir / "checkpoints" / "last.ckpt"
    refusal = r"full attention; this run configures local attention \(window=128\).*allow_other_attention=true"
    with pytest.raises(ConfigurationError, match=refusal):
        train(compose_config(tmp_path / "refused", ["model=local", f"ckpt_path={last}"]))
    train(compose_config(tmp_path / "backend", ["model.attention.backend=math", "test=false", f"ckpt_path={last}"]))
    train(compose_config(tmp_path / "allowed", ["model=local", "allow_other_attention=true", "trainer.max_steps=8",
                                                "optim.total_steps=6", "test=false", f"ckpt_path={last}"]))
    assert sorted(logged(read_metrics(tmp_path / "allowed" / "run"), "train/loss")) == [6, 7]


def losses_so_far(run_dir: Path) -> dict[int, float]:
    """The training losses a running train.py has written to its metrics.csv (created empty before training)."""
    try:
        return logged(read_metrics(run_dir), "train/loss")
    except (OSError, KeyError, ValueError):
        return {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_at_a_step_it_resumes_from(tmp_path, sig):
    """SIGTERM or SIGINT while training: the run finishes the step under way, saves last.ckpt there,
    skips the test, records `interrupted` in result.json, says how to resume and exits 128 + the
    signal (143, 130). Resumed from that checkpoint for 3 steps of the same schedule, it logs the
    losses of an uninterrupted run (all three runs are train.py processes)."""
    budget = ["trainer.max_steps=1000", "trainer.val_check_interval=50", "data.val_windows=8",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "a"
    with open(tmp_path / "a.log", "w") as log_file:
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, *budget, f"hydra.run.dir={run_dir}",
                                    "+logger.csv.flush_logs_every_n_steps=5"], cwd=tmp_path, stdout=log_file,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 300
        while not losses_so_far(run_dir) and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        process.send_signal(sig)
        returncode = process.wait(120)
    output = (tmp_path / "a.log").read_text()
    assert returncode == 128 + sig, output[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    steps, last = result["steps"], run_dir / "checkpoints" / "last.ckpt"
    assert result["status"] == "interrupted" and sig.name in result["reason"] and 0 < steps < 1000
    assert not [key for key in result["metrics"] if key.startswith("test/")]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == steps
    assert max(logged(read_metrics(run_dir), "train/loss")) == steps - 1
    assert f"ckpt_path={last}" in output and "Traceback" not in output

    schedule = [*budget, "test=false", f"trainer.max_steps={steps + 3}", "optim.total_steps=1000"]
    for name, extra in (("resumed", [f"ckpt_path={last}"]), ("uninterrupted", [])):
        finished = run_train_cli([*TINY, *schedule, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert "MultirunReport" not in finished.stderr  # its hooks have nothing to do in a single run
    resumed, uninterrupted = (logged(read_metrics(tmp_path / name), "train/loss")
                              for name in ("resumed", "uninterrupted"))
    assert sorted(resumed) == [steps, steps + 1, steps + 2]
    assert resumed == {step: uninterrupted[step] for step in resumed}


EXACT_AT_TINY_LENGTH = {"fma", "local", "htransformer"}  # at data.seq_len=32 they see every key at full resolution


def train_kind(tmp_path: Path, kind: str, objective: str) -> dict:
    """Each kind with its config's own defaults: 4 steps, validation at the end."""
    return train(compose_config(tmp_path, [f"model={kind}", f"objective={objective}", "test=false",
                                           "trainer.max_steps=4", "trainer.val_check_interval=4",
                                           "optim.warmup_steps=1"]))


@pytest.fixture(scope="module")
def full_results(tmp_path_factory):
    """train_kind for `full`, once per objective."""
    cache = {}

    def results(objective: str) -> dict:
        if objective not in cache:
            cache[objective] = train_kind(tmp_path_factory.mktemp(f"full-{objective}"), "full", objective)
        return cache[objective]
    return results


@pytest.mark.parametrize("kind, objective", [(kind, objective) for kind in GROUP_OPTIONS["model"]
                                              for objective in ("clm", "mlm")
                                              if objective == "mlm" or fma.ATTENTION_KINDS[kind].has_causal_form])
def test_every_attention_kind_trains_through_train_py(tmp_path, full_results, kind, objective):
    """Kinds that are exact at this length train, through train.py, to full's validation loss; the
    others (other parameters or another softmax) to within 0.05 of it after 4 small steps. (A kind
    without a causal form refuses objective=clm: tests/test_models.py.)"""
    reference = full_results(objective)["val/loss"]
    assert math.isfinite(reference) and reference < math.log(16) + 0.1   # about ln 16 at the start
    if kind == "full":
        return
    loss = train_kind(tmp_path, kind, objective)["val/loss"]
    if kind in EXACT_AT_TINY_LENGTH:
        assert loss == pytest.approx(reference, rel=1e-5)
    else:
        assert abs(loss - reference) < 0.05


def test_checkpoint_of_another_shape_is_refused(tmp_path, tiny_run):
    _, _, run_dir = tiny_run
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigurationError, match="does not fit the configured model"):
        train(compose_config(tmp_path, ["model.dim=48", f"ckpt_path={last}", "trainer.max_steps=8"]))
    with pytest.raises(ConfigurationError, match="ckpt_path="):
        train(compose_config(tmp_path, [f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    assert last.read_bytes() == before   # the checkpoint is untouched


def test_checkpoint_with_other_python_objects_is_refused_without_the_unsafe_hint(tmp_path):
    """A checkpoint holding a class instance is refused, naming the class; the message does not pass
    on PyTorch's advice to load it with weights_only=False."""
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(ConfigurationError) as raised:
        train(compose_config(tmp_path, [f"ckpt_path={path}"]))
    message = str(raised.value)
    assert "argparse.Namespace" in message and "ckpt_path=" in message
    assert "weights_only" not in message and "can still be loaded" not in message


def test_unknown_attention_kind_exits_with_a_message(tmp_path):
    """Exit 2 with one paragraph, and result.json with that paragraph as its reason."""
    result = run_train_cli([*TINY, "model.attention.name=nope", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Unknown attention kind 'nope'" in result.stderr and "model=<kind>" in result.stderr
    assert "Traceback" not in result.stderr
    recorded = json.loads((tmp_path / "run" / "result.json").read_text())
    paragraph = " ".join(result.stderr.split("error: ", 1)[1].split())
    assert (recorded["status"], recorded["reason"]) == ("config_error", paragraph)
    assert (recorded["metrics"], recorded["parameters"], recorded["steps"]) == ({}, None, 0)


def test_missing_data_file_exits_with_a_message(tmp_path):
    result = run_train_cli([*TINY, "data=text", f"data.path={tmp_path / 'nothing.txt'}",
                            f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.path=" in result.stderr and "Traceback" not in result.stderr


def test_seq_len_longer_than_a_split_is_refused(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("abcdefghij" * 100)   # 1000 bytes: valid and test splits get 50
    with pytest.raises(ConfigurationError, match="data.seq_len="):
        train(compose_config(tmp_path, ["data=text", f"data.path={text}", "data.seq_len=64"]))


def test_multirun_sweep_runs_every_point(tmp_path):
    result = run_train_cli(["-m", *TINY, "data.seq_len=16,32", "test=false", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                            f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for point in ("0", "1"):
        val = logged(read_metrics(tmp_path / "sweep" / point), "val/ppl")
        assert len(val) == 2
        assert json.loads((tmp_path / "sweep" / point / "result.json").read_text())["status"] == "ok"
    configs = [(tmp_path / "sweep" / p / ".hydra" / "overrides.yaml").read_text() for p in ("0", "1")]
    assert "data.seq_len=16" in configs[0] and "data.seq_len=32" in configs[1]
    # one final line per point, and every checkpoint saved with weights_only given
    assert result.stdout.count("final: val/acc") == 2
    assert "weights_only` was not set" not in result.stdout + result.stderr


def test_multirun_runs_past_a_failing_point_and_names_it(tmp_path):
    """Point 0 is a configuration error: point 1 still runs, and the multirun ends with exit code 1 and
    the failed point named."""
    result = run_train_cli(["-m", *TINY, "model.attention.name=nope,full", "test=false", "trainer.max_steps=2",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                           cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    statuses = [json.loads((tmp_path / "sweep" / point / "result.json").read_text())["status"] for point in "01"]
    assert statuses == ["config_error", "ok"]
    assert "1 of 2 points did not finish ok" in result.stderr
    assert "#0 (" in result.stderr and "model.attention.name=nope" in result.stderr.split("1 of 2 points")[1]


def test_nothing_evaluated_prints_no_empty_final_line(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="train")
    train(compose_config(tmp_path, ["test=false", "trainer.max_steps=2"]))   # validation every 3 steps: none
    assert "final:" not in capsys.readouterr().out and "final:" not in caplog.text


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").exists(), reason="needs ../shared/data")
def test_text_data_byte_level_bpc_falls(tmp_path):
    results = train(compose_config(tmp_path, ["data=text", f"data.path={SHARED_DATA / 'tinyshakespeare.txt'}",
                                              "data.val_windows=8", "trainer.max_steps=60", "trainer.val_check_interval=20",
                                              "optim.lr=3e-3"]))
    val_bpc = logged(read_metrics(tmp_path / "run"), "val/bpc")
    assert len(val_bpc) == 3
    bpc = list(val_bpc.values())
    assert bpc[0] > bpc[1] > bpc[2] and bpc[2] < 5.5   # an untrained model scores above 8 bits
    assert results["test/bpc"] == pytest.approx(results["test/loss"] / math.log(2), rel=1e-5)


def test_tensorboard_logger_writes_event_files(tmp_path):
    train(compose_config(tmp_path, ["logger=tensorboard", "test=false", "trainer.max_steps=3"]))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_logs_online_only_when_logged_in_and_its_server_answers(tmp_path, monkeypatch, caplog):
    """Offline without credentials; with them, offline too (and says so) when the server does not answer
    within 3 s, instead of retrying for minutes; online when it answers. No run starts either way."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.netrc
    cfg = compose_config(tmp_path, ["logger=wandb"])
    [logger] = build_loggers(cfg)
    assert logger._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    probes = []

    def unreachable(address, timeout):
        probes.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    [logger] = build_loggers(cfg)
    assert logger._offline is True and probes == [(("api.wandb.ai", 443), 3.0)]
    assert "logging offline" in caplog.text and "wandb sync" in caplog.text
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: socket.socket())
    [logger] = build_loggers(cfg)
    assert logger._offline is False


def test_ddp_on_the_cpu_runs_in_fp32(tmp_path):
    from train import trainer_config

    cfg = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tiny=False)
    assert trainer_config(cfg).precision == "32-true"


def test_fsdp_is_refused_off_the_gpu_with_the_fix(tmp_path):
    from train import trainer_config

    cfg = compose_config(tmp_path, ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"], tiny=False)
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.devices == 2
    with pytest.raises(ConfigurationError, match="GPUs only.*trainer=ddp"):
        trainer_config(cfg)


def test_kernel_profile_summary_counts_by_hand():
    """Two steps: kernels a (0-10 us, 5-20 us: overlapping) and b (30-40 us), one annotation (not a kernel),
    three host launches and a host op that is none: per step 17.5 us of kernels, 15 us busy, 1.5 kernels,
    1.5 launches; kernels listed by time; the host's functions by own time per step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from models.profiling import busy_time_us, host_summary, kernel_summary

    def event(name, start=0.0, end=0.0, device=DeviceType.CUDA, annotation=False, own=0.0):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation, time_range=span,
                               self_cpu_time_total=own, cpu_time_total=end - start)

    events = [event("a", 0, 10), event("a", 5, 20), event("b", 30, 40), event("AdamW.step", 0, 40, annotation=True),
              *(event(name, device=DeviceType.CPU) for name in ("cudaLaunchKernel", "cudaGraphLaunch",
                                                                "cudaMemcpyAsync", "aten::mm"))]
    summary, kernels = kernel_summary(SimpleNamespace(events=lambda: events), steps=2)
    assert summary == {"kernel_ms": 35 / 2 / 1e3, "gpu_busy_ms": 30 / 2 / 1e3, "kernels": 1.5, "launches": 1.5}
    assert kernels == [{"name": "a", "calls": 1.0, "ms": 25 / 2 / 1e3}, {"name": "b", "calls": 0.5, "ms": 10 / 2 / 1e3}]
    assert busy_time_us([(0, 4), (1, 2), (6, 7)]) == 5
    host = [event("step", 0, 300, DeviceType.CPU, own=100), event("step", 0, 500, DeviceType.CPU, own=300),
            event("aten::mm", 0, 50, DeviceType.CPU, own=50), events[0]]
    assert host_summary(SimpleNamespace(events=lambda: host), steps=2) == [
        {"name": "step", "calls": 1.0, "self_ms": 0.2, "total_ms": 0.4},
        {"name": "aten::mm", "calls": 0.5, "self_ms": 0.025, "total_ms": 0.025}]
