"""What a user sees from the command line: only real choices offered, and bad input stopped before training
with one paragraph and exit code 2."""

import hydra
import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT, TINY, compose_config, run_train_cli
from fma import ATTENTION_KINDS, ConfigurationError
from train import train


def test_config_groups_offer_only_real_choices():
    """What --help lists and what Hydra's message for an unknown option offers: the group's options,
    which must not include the base files the options extend."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options
        assert options("model") == sorted(ATTENTION_KINDS)
        assert options("data") == ["enwik8", "synthetic", "text", "wikitext103"]


@pytest.mark.parametrize("choice", ["model=doesnotexist", "model=_transformer"])
def test_an_unknown_option_exits_2_naming_the_options(tmp_path, choice):
    """Hydra cannot compose the command line: one paragraph that lists the real options, exit 2, nothing written."""
    result = run_train_cli([choice, f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    paragraph = result.stderr.split("error: ", 1)[1].strip()
    assert "\n" not in paragraph and choice in paragraph
    assert f"Choose one of {', '.join(sorted(ATTENTION_KINDS))}" in paragraph
    assert "Traceback" not in result.stderr and not (tmp_path / "logs").exists()


def test_a_gpu_asked_for_without_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for choice in ("trainer=gpu", "trainer=ddp"):
        with pytest.raises(ConfigurationError, match="needs a CUDA GPU.*trainer=cpu"):
            train(compose_config(tmp_path, [choice]))


@pytest.mark.parametrize("choice", ["data=text", "experiment=shakespeare_smoke"])
def test_text_data_without_a_path_names_the_setting(tmp_path, choice):
    cfg = compose_config(tmp_path, [choice])
    with pytest.raises(Exception) as raised:   # hydra.utils.instantiate wraps what the constructor raises
        hydra.utils.instantiate(cfg.data)
    assert isinstance(raised.value.__cause__, ConfigurationError)
    assert "data.path=/path/to/file.txt" in str(raised.value.__cause__)


def test_text_data_without_a_path_exits_2(tmp_path):
    result = run_train_cli([*TINY, "data=text", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.path=" in result.stderr and "Traceback" not in result.stderr


def test_a_short_test_split_stops_the_run_before_training(tmp_path):
    text = tmp_path / "small.txt"
    text.write_bytes(bytes(range(250)) * 4)   # 1000 bytes: 900 train, 70 valid, 30 test; a window needs 33
    result = run_train_cli([*TINY, "data=text", f"data.path={text}", "data.split_fractions=[0.9,0.07,0.03]",
                            f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                           cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "The test split of text has 30 tokens" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written: training ran"
