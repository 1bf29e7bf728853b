"""eval.py: a checkpoint scored from its own recorded config, at its length and others, and what it refuses."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, compose_config
from eval import evaluate
from fma import ConfigurationError
from train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished runs of full and of FMA (learned basis, max_seq_len = the training length 32)."""
    done = {}
    for kind in ("full", "fma"):
        tmp_path = tmp_path_factory.mktemp(kind)
        options = ["model.attention.block_size=4"] if kind == "fma" else []
        done[kind] = (train(compose_config(tmp_path, [f"model={kind}", *options])), tmp_path / "run")
    return done


def test_eval_scores_the_splits_as_train_py_did(runs):
    """At the training length best.ckpt's test metrics are those train.py reported (it tests the best
    checkpoint) and last.ckpt's validation metrics those of its last validation (the whole split: these runs
    validate on all of it); the result files hold them."""
    results, run_dir = runs["full"]
    tested = evaluate([f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"])["metrics"]
    validated = evaluate([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "split=valid"])["metrics"]
    assert set(tested) | set(validated) == set(results)
    for key, value in results.items():
        assert {**tested, **validated}[key] == pytest.approx(value, rel=1e-6), key
    written = json.loads((run_dir / "eval" / "last-valid-n32.json").read_text())
    assert written["metrics"] == validated and written["seq_len"] == 32 and written["split"] == "valid"


def test_eval_runs_at_other_lengths_where_the_model_can(runs, tmp_path):
    """Full attention (sinusoidal positions) scores 4x its training length; FMA's learned basis has no
    filters past max_seq_len, which is refused by name."""
    _, run_dir = runs["full"]
    out = tmp_path / "long.json"
    result = evaluate([f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data.seq_len=128", f"out={out}"])
    assert result["seq_len"] == 128 and json.loads(out.read_text())["metrics"]["test/loss"] > 0
    _, run_dir = runs["fma"]
    with pytest.raises(ConfigurationError, match="max_seq_len"):
        evaluate([f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data.seq_len=128"])


@pytest.mark.parametrize("argument, message", [
    ("model.dim=64", "cannot be changed at evaluation"),
    ("data.vocab_size=32", "does not fit the configured model"),
    ("split=train", "split=test, valid or both"),
])
def test_eval_refuses_what_would_not_score_this_model(runs, argument, message):
    _, run_dir = runs["full"]
    with pytest.raises(ConfigurationError, match=message):
        evaluate([f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", argument])


def test_eval_command_line_ends_a_mistake_with_one_paragraph_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={tmp_path / 'missing.ckpt'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "ckpt_path=" in done.stderr and "Traceback" not in done.stderr
