"""Train and evaluate a language model: `python train.py model=<kind> data=<dataset> [overrides]`.

Builds everything from configs/ with hydra.utils.instantiate, trains, then scores the test split
with the best checkpoint. Exit codes: 0 for a run that did what was asked; 2 for a mistake a user
can fix, which ends with a one-paragraph message (a command line Hydra cannot compose included);
143 or 130 for a run stopped by SIGTERM or SIGINT, resumable from its last.ckpt; 1 otherwise. However
a run ends, short of being killed, its folder gets `result.json` (see `train`). A multirun runs every
point and exits 1 if any did not finish ok (models.MultirunReport names them).
"""

import json
import logging
import math
import netrc
import os
import pickle
import re
import signal
import socket
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data.cache import atomic_path
from fma import ConfigurationError
from models import Interrupted, LanguageModelModule, LastCheckpoint, StopOnSignal
from models.lit_module import resolved_optim

log = logging.getLogger("train")
SKIP_THROUGHPUT_STEPS = 3  # tokens/s: median over the logged steps after the first few (warm-up, compilation)
WANDB_PROBE_S = 3.0   # seconds wandb's server gets to answer before a logged-in run logs offline instead


def load_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint at ckpt_path, tensors and plain data only (no arbitrary unpickling)."""
    if not os.path.isfile(ckpt_path):
        raise ConfigurationError(f"ckpt_path={ckpt_path} does not exist. Point ckpt_path= at a .ckpt file "
                                 f"(a run's checkpoints/last.ckpt), or drop it to start afresh.")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:   # PyTorch's message goes on to advise weights_only=False
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ConfigurationError(
            f"ckpt_path={ckpt_path} holds Python objects besides tensors and plain data"
            f"{f' ({found[1]})' if found else ''}, which this project does not load: unpickling them could run "
            f"any code. Use a .ckpt written by train.py.")
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ConfigurationError(f"ckpt_path={ckpt_path} is not a checkpoint this project can read "
                                 f"({type(error).__name__}: {first_line}). Use a .ckpt written by train.py.")


def recorded_config(path: str, saved: dict) -> dict:
    """The resolved config a checkpoint of train.py records (the module's hyper-parameter `config`)."""
    recorded = (saved.get("hyper_parameters") or {}).get("config")
    if not recorded:
        raise ConfigurationError(f"The checkpoint {path} does not record the config it was trained with "
                                 f"(hyper_parameters.config): it was not written by train.py. Use one that was.")
    return recorded


def build_module(cfg: DictConfig, config: dict) -> tuple:
    """(data module, LanguageModelModule, trainer config) of cfg; `config` is what the module records."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # the model's vocabulary size comes from the data (a trained BPE)
    context_parallel = bool(cfg.get("context_parallel", False))  # absent from older checkpoints' configs
    datamodule.same_rows_on_every_rank = context_parallel
    objective = hydra.utils.instantiate(cfg.objective)
    net = hydra.utils.instantiate(cfg.model, vocab_size=datamodule.vocab_size, causal=objective.causal,
                                  _convert_="all")
    trainer_cfg = trainer_config(cfg)
    module = LanguageModelModule(net, objective, metric=datamodule.metric, optim=OmegaConf.to_container(cfg.optim),
                                 seed=cfg.seed, compile=compile_mode(cfg, trainer_cfg),
                                 loss_chunk_tokens=cfg.loss_chunk_tokens, config=config,
                                 context_parallel=context_parallel)
    return datamodule, module, trainer_cfg


def check_resume(cfg: DictConfig, module: torch.nn.Module) -> None:
    """Refuse, before Lightning restores anything, a checkpoint that would not resume this run as
    configured: one of another attention kind or settings (unless allow_other_attention=true), other
    parameter shapes, or another optimizer or LR schedule. train.py's checkpoints record the config
    they were trained with (the module's hyper-parameter `config`)."""
    path = cfg.ckpt_path
    saved = load_checkpoint(path)
    recorded = recorded_config(path, saved)
    check_attention(path, recorded["model"]["attention"], OmegaConf.to_container(cfg.model.attention, resolve=True),
                    cfg.allow_other_attention)
    check_shapes(path, saved["state_dict"], module)
    check_schedule(path, resolved_optim(recorded["optim"], recorded["trainer"]["max_steps"]),
                   resolved_optim(OmegaConf.to_container(cfg.optim, resolve=True), cfg.trainer.max_steps))


def check_attention(path: str, saved: dict, configured: dict, allowed: bool) -> None:
    """The same attention kind and options; `backend` may differ, as it only picks an implementation
    of the same function (torch, triton; flash, math)."""
    differ = sorted(key for key in saved.keys() | configured.keys()
                    if key != "backend" and saved.get(key) != configured.get(key))
    if not differ or allowed:
        return

    def described(attention: dict) -> str:
        options = ", ".join(f"{key}={attention[key]}" for key in differ if key != "name" and key in attention)
        return f"{attention.get('name')} attention" + (f" ({options})" if options else "")

    raise ConfigurationError(
        f"The checkpoint {path} was trained with {described(saved)}; this run configures {described(configured)}. "
        f"Resume with the checkpoint's model= and model.attention.* settings (its run's .hydra/config.yaml lists "
        f"them), or set allow_other_attention=true to load its weights into this attention on purpose.")


def check_shapes(path: str, state_dict: dict, module: torch.nn.Module) -> None:
    """The configured model's parameter shapes, all of them, and no others: Lightning would half-restore
    a checkpoint that does not fit."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    problems = [f"{name}: checkpoint {found.get(name, 'missing')}, config {shape}"
                for name, shape in expected.items() if found.get(name) != shape]
    problems += [f"{name}: in the checkpoint only" for name in found.keys() - expected.keys()]
    if problems:
        raise ConfigurationError(
            f"The checkpoint {path} does not fit the configured model ({len(problems)} mismatches, e.g. "
            f"{'; '.join(problems[:3])}). Resume with the model=, model.* and data.* settings of the run that "
            f"wrote it (its .hydra/config.yaml lists them), or drop ckpt_path= to start afresh."
        )


def check_schedule(path: str, saved: dict, configured: dict) -> None:
    """The same optimizer settings and LR schedule, its length included. Otherwise the schedule, which
    keeps only its step, would be rebuilt for the new settings (the LR jumps) while the optimizer's
    restored state kept the old lr, betas and weight decay."""
    differ = [key for key in saved.keys() | configured.keys() if saved.get(key) != configured.get(key)]
    if not differ:
        return
    extend = (f" To train on past the end of its schedule, at its final learning rate, keep the schedule's "
              f"length: optim.total_steps={saved['total_steps']} with the trainer.max_steps=<n> you want."
              if "total_steps" in differ else "")
    changes = "; ".join(f"optim.{key}: {saved.get(key)} in the checkpoint, {configured.get(key)} here"
                        for key in sorted(differ))
    raise ConfigurationError(
        f"The checkpoint {path} was trained with other optimizer settings: {changes}"
        f" (optim.total_steps null means trainer.max_steps). Resuming would rebuild the LR schedule for this run's "
        f"settings (the learning rate jumps) while the restored optimizer state kept the checkpoint's. "
        f"Resume with the checkpoint's optim.* and trainer.max_steps (its run's .hydra/config.yaml lists them)."
        + extend)


def wandb_online() -> bool:
    """Whether wandb can log online: logged in (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry for its
    server) and the server answers within WANDB_PROBE_S. Unreachable, wandb would retry for minutes and
    then end the run with a CommError; the run logs offline instead and says so."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc().authenticators(host) is None:
                return False
        except (FileNotFoundError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((host, port), timeout=WANDB_PROBE_S).close()
        return True
    except OSError as error:
        log.warning("wandb: logged in, but %s:%d did not answer within %g s (%s): logging offline instead; "
                    "`wandb sync` on the run's wandb folder uploads it later", host, port, WANDB_PROBE_S, error)
        return False


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg.get("offline", "") is None:  # wandb: online only when logged in and its server answers
            logger_cfg = OmegaConf.merge(logger_cfg, {"offline": not wandb_online()})
        loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def trainer_config(cfg: DictConfig) -> DictConfig:
    """cfg.trainer with its precision decided (null: bf16-mixed on a GPU, 32-true on the CPU); a GPU
    asked for where PyTorch sees none is refused."""
    trainer_cfg = cfg.trainer
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        build = ("a CPU build of PyTorch" if torch.version.cuda is None
                 else f"PyTorch built for CUDA {torch.version.cuda}")
        raise ConfigurationError(
            f"trainer.accelerator={trainer_cfg.accelerator} (trainer=gpu, trainer=ddp) needs a CUDA GPU, and "
            f"{build} sees none. Use trainer=cpu, or trainer=default (a GPU where there is one), or "
            f"trainer=ddp trainer.accelerator=cpu trainer.devices=<n> for DDP on the CPU; or make a GPU visible "
            f"(CUDA_VISIBLE_DEVICES, a CUDA build of PyTorch).")
    if trainer_cfg.get("strategy") == "fsdp" and not on_gpu(trainer_cfg):
        raise ConfigurationError(
            f"trainer=fsdp (Lightning's FSDPStrategy) runs on GPUs only, and this run asks for "
            f"trainer.accelerator={trainer_cfg.accelerator}. Use trainer=ddp (trainer.accelerator=cpu for processes "
            f"on the CPU), or trainer=fsdp with trainer.accelerator=gpu on a machine with GPUs.")
    if trainer_cfg.precision is None:
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": "bf16-mixed" if on_gpu(trainer_cfg) else "32-true"})
    return trainer_cfg


def on_gpu(trainer_cfg: DictConfig) -> bool:
    return trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto" and torch.cuda.is_available())


# Attention kinds that compile=auto trains eager: their CUDA-graph step is known to fail (the reason).
EAGER_ON_AUTO = {
    "fastmax": "its compiled backward crashed the process (segmentation fault) in the first steps under CUDA "
               "graphs on the H200 with torch 2.11 (benchmarks/s10/fastmax_graphs_crash_call2.log)",
}


def compile_mode(cfg: DictConfig, trainer_cfg: DictConfig) -> bool | str:
    """cfg.compile with `auto` decided: reduce-overhead (CUDA graphs) when training on one GPU, where
    the launch cost bounds small and mid-sized steps (benchmarks/README.md); eager elsewhere (on a CPU
    compiling costs more than it saves in a short run; compiled multi-device training is not measured; context
    parallelism runs eager) and for the kinds of EAGER_ON_AUTO."""
    if cfg.compile != "auto":
        return cfg.compile
    if cfg.get("context_parallel", False) or cfg.model.attention.name in EAGER_ON_AUTO:
        return False
    devices = trainer_cfg.devices
    one_device = devices == 1 or (OmegaConf.is_list(devices) and len(devices) == 1)
    return "reduce-overhead" if on_gpu(trainer_cfg) and one_device and trainer_cfg.get("num_nodes", 1) == 1 else False


def configuration_error_in(error: BaseException) -> ConfigurationError | None:
    """The ConfigurationError behind `error`, if any (hydra.utils.instantiate wraps what it raises)."""
    while error is not None and not isinstance(error, ConfigurationError):
        error = error.__cause__
    return error


def exit_on_configuration_error(command, argv: list[str]) -> None:
    """command(argv) for a key=value entry point (eval.py, generate.py): a mistake it reports (a
    ConfigurationError) ends as one paragraph on stderr and exit code 2, anything else propagates."""
    try:
        command(argv)
    except Exception as error:
        user_error = configuration_error_in(error)
        if user_error is None:
            raise
        print(f"\nerror: {user_error}\n", file=sys.stderr)
        sys.exit(2)


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
    if isinstance(error, Interrupted):
        return "interrupted", str(error)
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

    However it ends (finished, a configuration error, out of memory, a crash, SIGTERM or SIGINT), it
    first writes `result.json` to the run folder, whole or not at all: `status` (ok, config_error, oom,
    failed, interrupted), `reason`, the final `metrics`, `parameters`, `tokens_per_s` (median over the
    logged steps after the first few), `peak_mem_gib`, `steps`, `wall_s`, `started`, `finished` and the
    resolved `config`; an exception is then raised on (Interrupted for a signal, see StopOnSignal). A
    process killed outright (SIGKILL) writes none.
    """
    run_dir, config = Path(cfg.paths.output_dir), OmegaConf.to_container(cfg, resolve=True)
    run_log, started = RunLog(), time.time()
    status, reason = "ok", ""
    with StopOnSignal() as stop:
        try:
            return fit_and_test(cfg, config, run_log, stop)
        except BaseException as error:
            status, reason = how_it_ended(error)
            raise
        finally:
            if rank_zero_only.rank == 0:
                result = {"status": status, "reason": reason, **run_log.summary(),
                          "wall_s": round(time.time() - started, 2),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}
                with atomic_path(run_dir / "result.json") as temporary:
                    temporary.write_text(json.dumps(result, indent=2) + "\n")


def fit_and_test(cfg: DictConfig, config: dict, run_log: RunLog, stop: StopOnSignal) -> dict[str, float]:
    """train's work (`config`: cfg resolved, as plain data); what result.json reports goes to `run_log`
    as it becomes known."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer_cfg = build_module(cfg, config)
    run_log.parameters = parameter_counts(module.net)
    log.info("model: %s attention, %.2fM parameters, compile=%s", cfg.model.attention.name,
             run_log.parameters["total"] / 1e6, str(compile_mode(cfg, trainer_cfg)).lower())
    if cfg.compile == "auto" and cfg.model.attention.name in EAGER_ON_AUTO:
        log.info("compile=auto trains %s eager: %s. compile=true or reduce-overhead still asks for it.",
                 cfg.model.attention.name, EAGER_ON_AUTO[cfg.model.attention.name])
    if cfg.ckpt_path:
        check_resume(cfg, module)

    callbacks = [hydra.utils.instantiate(c) for name, c in (cfg.get("callbacks") or {}).items()
                 if name != "progress_bar" or trainer_cfg.get("enable_progress_bar", True)]
    trainer = hydra.utils.instantiate(trainer_cfg, callbacks=[*callbacks, stop],
                                      logger=[*build_loggers(cfg), run_log])
    run_log.trainer = trainer

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if stop.stopped or stop.received:
        last = next((c.path for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        resume = (f"{last} holds that step; resume with ckpt_path={last}" if last and os.path.isfile(last)
                  else "no checkpoint was saved (callbacks.last_checkpoint is off)")
        name = stop.received.name if stop.received else "a signal to another process"
        raise Interrupted(stop.received or signal.SIGTERM,
                          f"{name}: training stopped after step {trainer.global_step} of {cfg.trainer.max_steps}, "
                          f"without the test; {resume}")
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    if cfg.test:
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and c.monitor), "")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    summary = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(results.items()) if not math.isnan(v))
    if summary and rank_zero_only.rank == 0:
        log.info("final: %s", summary)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """train(cfg), its end turned into an exit code. In a multirun, a point that fails is reported
    and recorded (its result.json) and the next one runs."""
    try:
        results = train(cfg)
    except Interrupted as stopped:   # a multirun stops here too: the signal was for all of it
        print(f"\ninterrupted: {stopped}\n", file=sys.stderr)
        sys.exit(stopped.exit_code)
    except Exception as error:
        user_error = configuration_error_in(error)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if user_error is not None:
            print(f"\nerror: {user_error}\n", file=sys.stderr)
        elif multirun:
            log.exception("this point failed; the multirun goes on")
        else:
            raise
        if not multirun:
            sys.exit(2)
        return None
    metric = next((v for k, v in results.items() if k in ("val/bpc", "val/ppl")), None)
    return metric  # for Hydra sweepers that minimise the validation metric


def command_line_error(error: Exception) -> str:
    """One paragraph for a command line Hydra cannot compose: an unknown option with its group's
    options, anything else (an unknown key, a syntax error) in Hydra's words, which name the fix."""
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return (f"{group}={option}: {group} has no option {option!r}. Choose one of {', '.join(error.options)} "
                f"(e.g. {group}={error.options[0]}).")
    cause = f" {error.__cause__}" if error.__cause__ is not None else ""
    return " ".join(f"{error}{cause}".split())


if __name__ == "__main__":
    # Hydra prints a command line it cannot compose in several paragraphs and exits 1; raised instead
    # (HYDRA_FULL_ERROR), it ends like any other mistake a user can fix: one paragraph and exit 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        print(f"\nerror: {command_line_error(error)}\n", file=sys.stderr)
        sys.exit(2)
