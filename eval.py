"""Score a trained checkpoint at any length: `python eval.py ckpt_path=<run>/checkpoints/best.ckpt [overrides]`.

The model and data come from the config the checkpoint records (train.py stores it, resolved);
overrides may change the data and the trainer, never the model:

    python eval.py ckpt_path=logs/train/runs/X/checkpoints/best.ckpt data.seq_len=16384
    python eval.py ckpt_path=... split=valid data.path=/other/text.txt trainer=gpu

split: test (default), valid (all of it) or both; compile= as train.py's (default false here). out: the result file (default: the run's eval/ folder,
<checkpoint>-<split>-n<seq_len>.json). The metrics are printed and written with the checkpoint, the
overrides and the resolved config. An override that changes a parameter's shape (another vocabulary)
is refused, as is a length the model cannot run (FMA's learned basis stops at its max_seq_len):
one paragraph, exit 2. The checkpoint is read with weights_only=True.
"""

import json
import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
from omegaconf import OmegaConf

from data.cache import atomic_path
from fma import ConfigurationError
from train import build_module, check_shapes, exit_on_configuration_error, load_checkpoint, recorded_config

log = logging.getLogger("eval")
SPLITS = ("test", "valid", "both")
OWN_KEYS = ("ckpt_path", "split", "out")


def parse_overrides(argv: list[str]) -> tuple[dict, list[str]]:
    """(eval.py's own settings, the data.* and trainer.* overrides) from key=value arguments."""
    own, overrides = {}, []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals:
            raise ConfigurationError(f"{argument!r} is not key=value; run e.g. python eval.py ckpt_path=<run>/"
                                     f"checkpoints/best.ckpt data.seq_len=4096.")
        if key in OWN_KEYS:
            own[key] = value
        elif key == "trainer" and value in ("gpu", "cpu"):
            overrides.append(f"trainer.accelerator={value}")
        elif key.startswith(("data.", "trainer.")) or key == "compile":
            overrides.append(argument)
        else:
            raise ConfigurationError(
                f"{key}= cannot be changed at evaluation: the checkpoint fixes the model and its training. Override "
                f"data.* (e.g. data.seq_len=, data.path=), trainer.* or trainer=gpu|cpu, compile=, split=, out=.")
    if "ckpt_path" not in own:
        raise ConfigurationError("eval.py needs ckpt_path=<run>/checkpoints/best.ckpt (a checkpoint train.py wrote).")
    if own.setdefault("split", "test") not in SPLITS:
        raise ConfigurationError(f"split={own['split']} is not one of {', '.join(SPLITS)}; set split=test, valid or both.")
    return own, overrides


def evaluate(argv: list[str]) -> dict:
    """Scores the checkpoint as argv asks; returns what it writes to its result file."""
    own, overrides = parse_overrides(argv)
    saved = load_checkpoint(own["ckpt_path"])
    recorded = recorded_config(own["ckpt_path"], saved)
    # Defaults of an evaluation: eager (one pass does not repay compiling) and the whole validation split.
    cfg = OmegaConf.merge(OmegaConf.create(recorded), {"compile": False, "data": {"val_windows": None}},
                          OmegaConf.from_dotlist(overrides))
    L.seed_everything(cfg.seed)
    datamodule, module, trainer_cfg = build_module(cfg, recorded)
    check_shapes(own["ckpt_path"], saved["state_dict"], module)
    module.load_state_dict(saved["state_dict"])
    trainer = hydra.utils.instantiate(trainer_cfg, logger=False, callbacks=[], enable_checkpointing=False,
                                      default_root_dir=str(Path(own["ckpt_path"]).parent))
    metrics = {}
    if own["split"] in ("test", "both"):
        metrics.update(trainer.test(module, datamodule=datamodule, verbose=False)[0])
    if own["split"] in ("valid", "both"):
        metrics.update(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    checkpoint = Path(own["ckpt_path"]).resolve()
    out = Path(own.get("out") or checkpoint.parent.parent / "eval" /
               f"{checkpoint.stem}-{own['split']}-n{cfg.data.seq_len}.json")
    result = {"checkpoint": str(checkpoint), "split": own["split"], "seq_len": cfg.data.seq_len,
              "metrics": {key: float(value) for key, value in sorted(metrics.items())}, "overrides": overrides,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        temporary.write_text(json.dumps(result, indent=2) + "\n")
    summary = ", ".join(f"{k} = {v:.4f}" for k, v in result["metrics"].items() if not math.isnan(v))
    print(f"{checkpoint.name} at seq_len {cfg.data.seq_len}: {summary}\nwritten to {out}")
    return result


def main() -> None:
    exit_on_configuration_error(evaluate, sys.argv[1:])


if __name__ == "__main__":
    main()
