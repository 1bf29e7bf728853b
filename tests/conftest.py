"""Shared test helpers: compose the real configs, run train.py in-process or as a command."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A model and run small enough for a CPU test; data=synthetic needs no file and no network.
TINY = [
    "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "model.dim=32", "model.depth=1", "model.num_heads=2", "data.seq_len=32", "data.batch_size=4",
    "optim.warmup_steps=2",
]


def assert_prefix_unchanged(kind: str, out: torch.Tensor, out_changed: torch.Tensor) -> None:
    """Outputs up to t after a change past t: bitwise equal, except Reformer's, whose prefix tokens the
    change can move inside the sorted blocks, which reorders their sums (rounding only, float64)."""
    if kind == "reformer":
        torch.testing.assert_close(out, out_changed, rtol=0, atol=1e-12)
    else:
        assert torch.equal(out, out_changed)


def require_shared(*parts: str) -> Path:
    """A file of ../shared/data; skips the test where the checkout has no shared/ beside it (CI has one)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}")
    return path


def compose_config(tmp_path: Path, overrides: list[str], tiny: bool = True):
    """The configuration train.py would see, with outputs and caches under tmp_path."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[*(TINY if tiny else []), f"paths.output_dir={tmp_path / 'run'}",
                                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """{step: value} of one logged key."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def run_train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never touch the network: the hub libraries are told they are offline, and a connection
    opened in the test process (train.py's probe of wandb's server) fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")

    def no_connection(address, *args, **kwargs):
        raise OSError(f"tests open no connections ({address})")

    monkeypatch.setattr(socket, "create_connection", no_connection)
