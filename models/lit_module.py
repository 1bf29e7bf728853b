"""The LightningModule: one training recipe for every attention kind and both objectives."""

import contextlib
import math

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fma.context_parallel import check_model, context_parallel
from fma.errors import ConfigurationError

from .metrics import LanguageModelMetric
from .objectives import IGNORE


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers receive this training step's metrics (every trainer.log_every_n_steps steps).
    Metrics are logged only then: a `self.log` call costs the host more than a CUDA-graph step's
    launch, and Lightning writes the values of the other steps nowhere."""
    return trainer._logger_connector.should_update_logs  # the test Lightning's own monitors use


def resolved_optim(optim: dict, max_steps: int) -> dict:
    """`optim` with the schedule's length resolved (total_steps null: trainer.max_steps): what a run
    resumed from a checkpoint must share with the run that wrote it."""
    return {**optim, "total_steps": optim.get("total_steps") or max_steps}


class LanguageModelModule(L.LightningModule):
    """Trains `net` (tokens -> logits) with `objective`; logs train/loss, val/<metric>, test/<metric>.

    `metric` is "bpc" (byte-level data) or "ppl" (token-level data). `optim` holds AdamW and schedule
    settings: lr, weight_decay, betas, warmup_steps, total_steps (null: trainer.max_steps), min_lr_ratio.
    `config` is the run's resolved config as plain data, stored in checkpoints (loadable with
    `torch.load(weights_only=True)`). `loss_chunk_tokens` (None: off) applies the output head and
    the loss to that many tokens at a time and recomputes each chunk's logits in backward, so fp32
    logits [tokens, vocab] never exist whole: the same loss for less memory and one more head pass.
    `compile`: False (eager), True (torch.compile the network and, where its shapes are fixed, the head
    and loss; default mode) or "reduce-overhead" (compiled and replayed as CUDA graphs, which removes
    the per-kernel launch cost that bounds FMA's step on a GPU; benchmarks/README.md).

    `context_parallel` (FMA only, eager only): under a multi-process trainer, all ranks form one
    context-parallel group (no data parallelism besides): every rank gets the same batch (the data module's
    `same_rows_on_every_rank`), the objective turns the whole sequences into inputs and targets (masked LM:
    masks drawn from a generator seeded without the rank, so the same on every rank), and rank r of R runs
    the network on positions [r c, (r + 1) c), c = seq_len / R, under `fma.context_parallel.context_parallel`.
    Its training loss is its chunks' summed NLL / the whole batch's scored count * R: DDP averages the R
    ranks' gradients, so the step's gradient is the one process's; the mean over ranks of the logged
    train/loss is the whole batch's loss. Evaluation sums NLL and counts over ranks as under DDP. On one
    process it changes nothing.
    """

    def __init__(self, net: torch.nn.Module, objective, *, metric: str, optim: dict, seed: int = 0,
                 compile: bool | str = False, loss_chunk_tokens: int | None = None, config: dict | None = None,
                 context_parallel: bool = False):
        super().__init__()
        if compile not in (False, True, "reduce-overhead"):
            raise ConfigurationError(f"compile={compile!r} is not a choice; set compile=auto (CUDA graphs on one GPU, "
                                     f"eager elsewhere), compile=false (eager), compile=true (torch.compile) or "
                                     f"compile=reduce-overhead (compiled, as CUDA graphs).")
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ConfigurationError(f"loss_chunk_tokens={loss_chunk_tokens} must be a positive number of "
                                     f"tokens, or null to apply the head to all at once; set loss_chunk_tokens=.")
        total_steps = optim.get("total_steps")
        if total_steps is not None and total_steps < 1:
            raise ConfigurationError(f"optim.total_steps={total_steps!r} must be a positive number of steps (the LR "
                                     f"schedule's length), or null for trainer.max_steps; set optim.total_steps=.")
        if context_parallel:
            check_model(net)
            if compile:
                raise ConfigurationError(f"context_parallel=true runs eager (its exchange is point-to-point "
                                         f"communication inside the layers); compile={compile!r} is not supported "
                                         f"with it. Set compile=false or compile=auto.")
        self.save_hyperparameters(ignore=["net", "objective"])
        self.net, self.objective, self.optim, self.seed = net, objective, dict(optim), seed
        self.context_parallel = context_parallel
        self.context_group, self.context_world, self.context_rank = None, 1, 0  # set up by `setup` under DDP
        self.loss_chunk_tokens = loss_chunk_tokens
        self.val_metric = LanguageModelMetric(metric)
        self.test_metric = LanguageModelMetric(metric)
        self.cuda_graphs = compile == "reduce-overhead"
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.net.compile(mode=mode)
            if not objective.sparse_targets and loss_chunk_tokens is None:  # masked LM scores a varying count
                self._head_nll = torch.compile(self._head_nll, mode=mode)

    def setup(self, stage: str) -> None:
        if self.context_parallel and self.trainer.world_size > 1 and self.context_group is None:
            datamodule = self.trainer.datamodule
            if datamodule is not None:
                check_model(self.net, datamodule.seq_len, self.trainer.world_size)
            # Its own group: the exchange's point-to-point traffic stays off DDP's gradient all-reduce.
            group = dist.new_group(list(range(self.trainer.world_size)))
            dist.barrier(group)  # a first collective of every rank (NCCL's batched sends ask for it)
            self.use_context_parallel(group)

    def use_context_parallel(self, group) -> None:
        """Split every sequence over the ranks of `group` (all of the trainer's ranks, see the class). The
        network stays context-parallel from here on, so that blocks recomputed in backward
        (model.checkpoint_blocks) exchange as their forward did."""
        self.context_group = group
        self.context_world, self.context_rank = dist.get_world_size(group), dist.get_rank(group)
        self._context_parallel = contextlib.ExitStack()
        self._context_parallel.enter_context(context_parallel(self.net, group))

    def _step_seed(self, rank: int) -> int:
        return hash((self.seed, self.global_step, rank)) % 2**63

    def _features_and_targets(self, batch, generator=None):
        """Final features [tokens, dim], targets [tokens] (IGNORE where nothing is scored) and None: every
        position, or only the scored ones for an objective with sparse targets (masked LM). Context-parallel:
        of this rank's chunk of every sequence, and the whole sequences' scored count instead of None."""
        split = self.context_group is not None
        if split and generator is None:  # masked LM: rank 0's draws, which one process would make
            generator = torch.Generator(self.device).manual_seed(self._step_seed(0))
        inputs, targets = self.objective(
            batch, mask_token_id=self.net.mask_token_id, vocab_size=self.net.vocab_size, generator=generator
        )
        scored_total = None
        if split:
            scored_total = (targets != IGNORE).sum()
            chunk = inputs.shape[1] // self.context_world
            part = slice(self.context_rank * chunk, (self.context_rank + 1) * chunk)
            inputs, targets = inputs[:, part], targets[:, part]
        if self.cuda_graphs:  # a new step: the graphs may reuse the buffers of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        features = self.net(inputs, head=False)
        if self.objective.sparse_targets:
            scored = (targets != IGNORE).nonzero(as_tuple=True)  # found once: one host sync, not two
            return features[scored], targets[scored], scored_total
        return features.flatten(0, 1), targets.flatten(), scored_total

    @staticmethod
    def _nll(logits, targets):
        """Summed cross-entropy over the scored targets."""
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def _head_nll(self, features, targets):
        return self._nll(self.net.head(features).float(), targets)

    def _chunks(self, features, targets):
        """(features, targets) pieces of at most `loss_chunk_tokens` tokens; one piece when unset."""
        size = self.loss_chunk_tokens or max(1, len(targets))
        return zip(features.split(size), targets.split(size))

    def _nll_sum(self, features, targets):
        """The summed loss; with `loss_chunk_tokens`, each chunk's logits are recomputed in backward."""
        if self.loss_chunk_tokens is None:
            return self._head_nll(features, targets)
        return sum(checkpoint(self._head_nll, *chunk, use_reentrant=False) for chunk in self._chunks(features, targets))

    def on_train_batch_start(self, batch, batch_idx):
        # Every random draw of a step (dropout, masking) is a function of (seed, step, rank), so a
        # resumed run repeats the uninterrupted one exactly. Only the generators this process draws
        # from are seeded: torch.manual_seed also visits every other accelerator type, at a host
        # cost per step larger than a CUDA-graph step's launch.
        seed = self._step_seed(self.global_rank)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def training_loss(self, batch):
        """The loss this rank backpropagates: the batch's mean NLL over its scored targets; context-parallel,
        this rank's share of it times the ranks (see the class), so that DDP's average is the gradient."""
        features, targets, scored_total = self._features_and_targets(batch)
        if scored_total is None:
            return self._nll_sum(features, targets) / (targets != IGNORE).sum().clamp(min=1)  # may score nothing
        return self._nll_sum(features, targets) / scored_total.clamp(min=1) * self.context_world

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        if logs_this_step(self.trainer):  # shown by models.ProgressBar: prog_bar=True would read it every step
            # the mean over ranks, reduced only on the steps the loggers receive (which read it anyway)
            self.log("train/loss", loss, sync_dist=True)
        return loss

    def _eval_step(self, batch, batch_idx, metric):
        # Masked LM draws the same masks at every evaluation: a generator seeded by the batch index.
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + batch_idx)
        features, targets, _ = self._features_and_targets(batch, generator)
        scored = targets != IGNORE
        nll, correct = 0.0, 0
        for chunk, chunk_targets in self._chunks(features, targets):
            logits = self.net.head(chunk).float()
            nll = nll + self._nll(logits, chunk_targets)
            correct = correct + (logits.argmax(-1) == chunk_targets).sum()  # never equal at IGNORE (-100)
        metric.update(nll, scored.sum(), correct)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, self.val_metric)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, self.test_metric)

    def _log_metric(self, metric, stage: str):
        values = metric.compute()
        self.log_dict({f"{stage}/{name}": value.float() for name, value in values.items()},
                      prog_bar=stage == "val", rank_zero_only=False)
        metric.reset()

    def on_validation_epoch_end(self):
        self._log_metric(self.val_metric, "val")

    def on_test_epoch_end(self):
        self._log_metric(self.test_metric, "test")

    @property
    def fused_optimizer(self) -> bool:
        """AdamW as one kernel per step for all parameters (not one per tensor): on a GPU, unless fp16's loss
        scaler is in use, whose scaled gradients a fused optimizer unscales only inside its step."""
        return self.device.type == "cuda" and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning refuses to clip for a fused optimizer (its gradients could be loss-scaled); ours is
        fused only where they are not (bf16, fp32), so it is clipped here, as Lightning clips the others."""
        if not gradient_clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    def configure_optimizers(self):
        # No weight decay on biases, norms and positions-free vectors (nanoGPT's rule: decay matrices only).
        decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.net.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim["lr"], betas=tuple(self.optim["betas"]),
            fused=self.fused_optimizer,
        )
        total_steps = resolved_optim(self.optim, self.trainer.max_steps)["total_steps"]
        if total_steps is None or total_steps < 1:  # 0, or Lightning's -1 ("no limit"): a schedule without an end
            raise ConfigurationError(f"trainer.max_steps={total_steps} must be a positive number of steps: the LR "
                                     f"schedule ends there. Set trainer.max_steps=<n> (or optim.total_steps=<n> "
                                     f"for the schedule alone).")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, warmup_steps=self.optim["warmup_steps"], total_steps=total_steps,
            min_lr_ratio=self.optim["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
