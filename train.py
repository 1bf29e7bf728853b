"""Train and evaluate a language model: `python train.py model=<kind> data=<dataset> [overrides]`.

Builds everything from configs/ with hydra.utils.instantiate, trains, then scores the test split
with the best checkpoint. Mistakes a user can fix end with a one-paragraph message and exit code 2.
However a run ends, short of being killed, its folder gets `result.json` (see `train`).
"""

import json
import logging
import math
import netrc
import os
import re
import statistics
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data.cache import atomic_path
from fma import ConfigurationError
from models import LanguageModelModule

log = logging.getLogger("train")
SKIP_THROUGHPUT_STEPS = 3  # tokens/s: median over the logged steps after the first few (warm-up, compilation)


def check_checkpoint_fits(module: torch.nn.Module, ckpt_path: str) -> None:
    """Refuse a checkpoint whose parameter shapes differ from the configured model, before Lightning
    half-restores it. Loads tensors and plain data only (no arbitrary unpickling)."""
    if not os.path.isfile(ckpt_path):
        raise ConfigurationError(f"ckpt_path={ckpt_path} does not exist. Point ckpt_path= at a .ckpt file "
                                 f"(a run's checkpoints/last.ckpt), or drop it to start afresh.")
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as error:
        raise ConfigurationError(f"ckpt_path={ckpt_path} is not a checkpoint this project can load safely "
                                 f"({type(error).__name__}: {str(error)[:200]}). Use a .ckpt written by train.py.")
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved.items()}
    problems = [f"{name}: checkpoint {found.get(name, 'missing')}, config {shape}"
                for name, shape in expected.items() if found.get(name) != shape]
    problems += [f"{name}: in the checkpoint only" for name in found.keys() - expected.keys()]
    if problems:
        raise ConfigurationError(
            f"The checkpoint {ckpt_path} does not fit the configured model ({len(problems)} mismatches, e.g. "
            f"{'; '.join(problems[:3])}). Resume with the model=, model.* and data.* settings of the run that "
            f"wrote it (its .hydra/config.yaml lists them), or drop ckpt_path= to start afresh."
        )


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg.get("offline", "") is None:  # wandb: online only when logged in
            logger_cfg = OmegaConf.merge(logger_cfg, {"offline": not has_wandb_credentials()})
        loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def configuration_error_in(error: BaseException) -> ConfigurationError | None:
    """The ConfigurationError behind `error`, if any (hydra.utils.instantiate wraps what it raises)."""
    while error is not None and not isinstance(error, ConfigurationError):
        error = error.__cause__
    return error


def parameter_counts(net: torch.nn.Module) -> dict[str, int]:
    """Parameters in all (the tied output head counted once), in the attention layers, outside the embedding."""
    total = sum(p.numel() for p in net.parameters())
    attention = sum(p.numel() for name, p in net.named_parameters() if ".attention." in name)
    return {"total": total, "attention": attention, "non_embedding": total - net.embedding.weight.numel()}


class RunLog(Logger):
    """Gathers what result.json reports while the run goes: the values the trainer logs (the same that
    csv/metrics.csv gets, whichever loggers are configured), the parameter counts and the trainer."""

    name, version = "result", ""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}   # the last logged value of every val/* and test/* metric
        self.tokens_per_s: list[float] = []
        self.peak_mem_gib: list[float] = []
        self.parameters: dict[str, int] | None = None
        self.trainer = None

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            if key.startswith(("val/", "test/")):
                self.metrics[key] = float(value)
        for key, values in (("train/tokens_per_s", self.tokens_per_s), ("train/peak_mem_gib", self.peak_mem_gib)):
            if key in metrics:
                values.append(float(metrics[key]))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def summary(self) -> dict:
        throughput = self.tokens_per_s[min(SKIP_THROUGHPUT_STEPS, len(self.tokens_per_s) // 2):]
        return {"metrics": dict(sorted(self.metrics.items())), "parameters": self.parameters,
                "tokens_per_s": statistics.median(throughput) if throughput else None,
                "peak_mem_gib": max(self.peak_mem_gib, default=None),
                "steps": self.trainer.global_step if self.trainer is not None else 0}


def how_it_ended(error: BaseException) -> tuple[str, str]:
    """(status, one-line reason) of a run that raised `error`."""
    user_error = configuration_error_in(error)
    if user_error is not None:
        return "config_error", " ".join(str(user_error).split())
    # Lightning turns Ctrl-C during fit or test into SystemExit(1), raised while handling the KeyboardInterrupt
    if isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
        return "interrupted", "KeyboardInterrupt"
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or re.search(r"out of memory|can't allocate memory", str(error), re.I):
        return "oom", reason[:500]
    return "failed", reason[:500]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test; returns the final validation and test metrics.

    However it ends (finished, a configuration error, out of memory, a crash, Ctrl-C), it first writes
    `result.json` to the run folder, whole or not at all: `status` (ok, config_error, oom, failed,
    interrupted), `reason`, the final `metrics`, `parameters`, `tokens_per_s` (median over the logged
    steps after the first few), `peak_mem_gib`, `steps`, `wall_s`, `started`, `finished` and the
    resolved `config`; an exception is then raised on. A process killed outright (SIGKILL) writes none.
    """
    run_dir, config = Path(cfg.paths.output_dir), OmegaConf.to_container(cfg, resolve=True)
    run_log, started = RunLog(), time.time()
    status, reason = "ok", ""
    try:
        return fit_and_test(cfg, run_log)
    except BaseException as error:
        status, reason = how_it_ended(error)
        raise
    finally:
        if rank_zero_only.rank == 0:
            result = {"status": status, "reason": reason, **run_log.summary(), "wall_s": round(time.time() - started, 2),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}
            with atomic_path(run_dir / "result.json") as temporary:
                temporary.write_text(json.dumps(result, indent=2) + "\n")


def fit_and_test(cfg: DictConfig, run_log: RunLog) -> dict[str, float]:
    """train's work; what result.json reports goes to `run_log` as it becomes known."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # the model's vocabulary size comes from the data (a trained BPE)
    objective = hydra.utils.instantiate(cfg.objective)
    net = hydra.utils.instantiate(cfg.model, vocab_size=datamodule.vocab_size, causal=objective.causal,
                                  _convert_="all")
    module = LanguageModelModule(net, objective, metric=datamodule.metric, optim=OmegaConf.to_container(cfg.optim),
                                 seed=cfg.seed, compile=cfg.compile, loss_chunk_tokens=cfg.loss_chunk_tokens,
                                 config=OmegaConf.to_container(cfg, resolve=True))
    run_log.parameters = parameter_counts(net)
    log.info("model: %s attention, %.2fM parameters", cfg.model.attention.name, run_log.parameters["total"] / 1e6)

    trainer_cfg = cfg.trainer
    if trainer_cfg.precision is None:
        on_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
            trainer_cfg.accelerator == "auto" and torch.cuda.is_available())
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": "bf16-mixed" if on_gpu else "32-true"})
    callbacks = [hydra.utils.instantiate(c) for name, c in (cfg.get("callbacks") or {}).items()
                 if name != "progress_bar" or trainer_cfg.get("enable_progress_bar", True)]
    trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=[*build_loggers(cfg), run_log])
    run_log.trainer = trainer

    if cfg.ckpt_path:
        check_checkpoint_fits(module, cfg.ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    latest = next((c for c in trainer.checkpoint_callbacks if not c.monitor), None)
    if latest is not None:  # the final state too, not only every N steps
        trainer.save_checkpoint(latest.format_checkpoint_name({}))
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    if cfg.test:
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    summary = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(results.items()) if not math.isnan(v))
    log.info("final: %s", summary)
    print(f"final: {summary}")
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except Exception as error:
        user_error = configuration_error_in(error)
        if user_error is None:
            raise
        print(f"\nerror: {user_error}\n", file=sys.stderr)
        sys.exit(2)
    metric = next((v for k, v in results.items() if k in ("val/bpc", "val/ppl")), None)
    return metric  # for Hydra sweepers that minimise the validation metric


if __name__ == "__main__":
    main()
