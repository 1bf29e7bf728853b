"""DDP against one process: the same windows and the same global batch must give the same losses.

    python scripts/check_ddp.py                        # 2 CPU processes (gloo) against 1, tiny model, ~1 min
    python scripts/check_ddp.py --accelerator gpu --devices 8 --batch-size 16
    python scripts/check_ddp.py --context-parallel     # context_parallel=true: each sequence split over 2 ranks

Runs train.py twice on a tiny causal model with dropout 0: once on one process with data.batch_size=B, once
as DDP over --devices processes (trainer=ddp) with data.batch_size=B/devices, both in fp32 (precision
32-true; bf16 would differ by rounding). Why they must agree: data/base.py's RankSampler gives rank r of W,
row j of global batch b, item (b W + r) (B/W) + j, so the W ranks together see items b B .. (b+1) B - 1,
the one process's batch b; DDP averages the ranks' gradients, and with the causal objective every rank
scores the same number of tokens, so the average of their mean losses is the global mean loss and the
gradients (clipping included: it sees the averaged gradient) are the one process's. Dropout and masked-LM
masks are drawn per rank (models/lit_module.py seeds them by (seed, step, rank)), so those cannot match, and
masked LM scores a varying count per rank: the check is for objective=clm with model.dropout=0.

Compared, within --rtol/--atol: the global training loss of every step (a callback, `GlobalLoss`, averages
the ranks' losses at every step; train.py's train/loss is that mean too, on the steps it logs), val/loss and
test/loss from csv/metrics.csv (the metric sums NLL and counts across ranks), and every weight of the final
checkpoints/last.ckpt (written once, by rank 0), the weights within --weights-atol: AdamW amplifies fp32
rounding where a gradient is near zero (measured: 1.8e-6 after 6 steps, model=fma). Prints one row per
quantity; exit 0 when all agree, 1 if any does not, 2 for a bad command line.

--resume: the multi-process run stops after half the steps, and ONE process resumes its last.ckpt (model,
optimizer, schedule, step and data position) for the rest; compared with the one-process run over the resumed
half (every run's schedule spans --steps: optim.total_steps). Why they must agree: the checkpoint holds the
optimizer step, not a rank's place, and the sampler maps a step to the same global batch for any number of
ranks, so a checkpoint written by W ranks resumes on any other number (measured: 2 CPU ranks -> 1, the
resumed losses equal to all printed digits).

--context-parallel: the second run is train.py's context_parallel=true over --devices processes, every rank
holding the whole batch of B rows and running its contiguous 1/devices of each sequence (both runs model=fma
with block_size 4, so that data.seq_len=32 splits into whole blocks on up to 8 ranks; CONTEXT_PARALLEL). Why they
must agree: each rank's loss is its chunks' summed NLL over the whole batch's scored count, times the ranks,
so the mean over ranks is the global loss and DDP's averaged gradient the one process's (the exchange's
backward carries every other rank's share). Masked-LM masks are drawn for the whole sequences from a
generator seeded without the rank, so objective=mlm may be checked too; dropout still may not.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.precision=32-true", "model.dim=32", "model.depth=1",
        "model.num_heads=2", "model.dropout=0.0", "data.seq_len=32", "optim.warmup_steps=2", "objective=clm"]
LOSSES_FILE = "global_losses.json"
CONTEXT_PARALLEL = ["model=fma", "model.attention.block_size=4"]  # before the user's overrides: they may change them


class GlobalLoss(L.Callback):
    """Lightning callback: the mean over ranks of each step's training loss, written by rank 0 to `path`
    as {step: loss} when training ends (steps counted from 0, as csv/metrics.csv counts them)."""

    def __init__(self, path: str):
        self.path, self.losses = Path(path), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step - 1] = float(trainer.strategy.reduce(loss.detach().double(), reduce_op="mean"))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.losses, indent=1) + "\n")


def train_command(*, devices: int, batch_size: int, steps: int, out: Path, accelerator: str,
                  overrides: list[str], context_parallel: bool = False, strategy: str = "ddp") -> list[str]:
    """train.py's command line for one of the two runs: global batch `batch_size` over `devices` processes
    (context_parallel: every rank holds all of it, each its slice of every sequence; for both runs)."""
    if devices < 1 or (batch_size % devices and not context_parallel):
        raise ValueError(f"--batch-size {batch_size} must split evenly over --devices {devices}")
    trainer = ([f"trainer={strategy}", f"trainer.accelerator={accelerator}", f"trainer.devices={devices}"] if devices > 1
               else [f"trainer={'cpu' if accelerator == 'cpu' else 'gpu'}"])
    split = ([*CONTEXT_PARALLEL, *(["context_parallel=true"] if devices > 1 else [])] if context_parallel else [])
    rows = batch_size if context_parallel else batch_size // devices
    chosen = {o.split("=", 1)[0] for o in overrides}  # what the overrides set, set once (Hydra refuses a group twice)
    defaults = [o for o in [*TINY, *split] if o.split("=", 1)[0] not in chosen]
    return [sys.executable, str(ROOT / "train.py"), *trainer, *defaults, f"trainer.max_steps={steps}",
            f"data.batch_size={rows}", f"paths.output_dir={out}", f"paths.cache_dir={out}/cache",
            "+callbacks.global_loss._target_=check_ddp.GlobalLoss", f"+callbacks.global_loss.path={out / LOSSES_FILE}",
            *overrides]


def planned_runs(args) -> list[tuple[str, Path, list[str]]]:
    """(name, output folder, train.py command) of each run, in order: one process, the multi-process run
    (--resume: half the steps), and with --resume one process resuming the latter's last.ckpt."""
    half = args.steps // 2
    schedule = [f"optim.total_steps={args.steps}"] if args.resume else []  # one cosine schedule for every run
    plan = [("one", 1, args.steps, []), ("ddp", args.devices, half if args.resume else args.steps, [])]
    if args.resume:
        plan.append(("resumed", 1, args.steps, [f"ckpt_path={(args.out / 'ddp').resolve()}/checkpoints/last.ckpt"]))
    return [(name, (args.out / name).resolve(),
             train_command(devices=devices, batch_size=args.batch_size, steps=steps, out=(args.out / name).resolve(),
                           accelerator=args.accelerator, overrides=[*schedule, *args.overrides, *extra],
                           context_parallel=args.context_parallel, strategy=args.trainer))
            for name, devices, steps, extra in plan]


def read_run(out: Path) -> dict:
    """What a finished run left: training losses by step, val/loss by step, test/loss, final weights."""
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key: {int(r["step"]): float(r[key]) for r in rows if r.get(key)} for key in ("val/loss", "test/loss")}
    losses = {int(step): value for step, value in json.loads((out / LOSSES_FILE).read_text()).items()}
    weights = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {"train_loss": losses, "val_loss": logged["val/loss"], "test_loss": logged["test/loss"], "weights": weights}


def close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def compare_runs(one: dict, ddp: dict, *, rtol: float, atol: float, weights_atol: float | None = None) -> list[dict]:
    """Rows {quantity, one, ddp, diff, ok}: every step's loss of either run (a step missing in one fails),
    val/loss per validation, test/loss, and the largest weight difference (each tensor, shapes and names
    equal, within rtol and weights_atol (None: atol) elementwise)."""
    weights_atol = atol if weights_atol is None else weights_atol
    rows = []
    for key in ("train_loss", "val_loss", "test_loss"):
        for step in sorted(one[key].keys() | ddp[key].keys()):
            a, b = one[key].get(step, math.nan), ddp[key].get(step, math.nan)
            rows.append({"quantity": f"{key} step {step}", "one": a, "ddp": b, "diff": abs(a - b),
                         "ok": close(b, a, rtol, atol)})
    names = one["weights"].keys() | ddp["weights"].keys()
    worst, worst_name, ok = 0.0, "", bool(names)
    for name in sorted(names):
        a, b = one["weights"].get(name), ddp["weights"].get(name)
        if a is None or b is None or a.shape != b.shape:
            ok, worst, worst_name = False, math.inf, name
            continue
        a, b = a.double(), b.double()
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        ok &= bool(((a - b).abs() <= weights_atol + rtol * a.abs()).all())
        if diff > worst:
            worst, worst_name = diff, name
    rows.append({"quantity": f"weights (largest: {worst_name or '-'})", "one": math.nan, "ddp": math.nan,
                 "diff": worst, "ok": ok})
    return rows


def report(rows: list[dict], label: str = "ddp") -> str:
    lines = [f"{'quantity':<48} {'one process':>14} {label:>14} {'|diff|':>10}  ok"]
    lines += [f"{r['quantity']:<48} {r['one']:>14.8g} {r['ddp']:>14.8g} {r['diff']:>10.3g}  "
              f"{'yes' if r['ok'] else 'NO'}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="DDP processes (default 2)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, rows (default 4)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "check_ddp")
    parser.add_argument("--rtol", type=float, default=1e-5, help="fp32 over a few steps (default 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-6, help="losses (default 1e-6)")
    parser.add_argument("--weights-atol", type=float, default=2e-5,
                        help="weights (default 2e-5, 2%% of one step at lr 1e-3: AdamW divides a gradient by its "
                             "running RMS, so where a gradient is near 0 its fp32 rounding moves the weight by a "
                             "visible fraction of lr)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--context-parallel", action="store_true",
                        help="the second run context-parallel (context_parallel=true, model=fma), not DDP")
    parser.add_argument("--resume", action="store_true",
                        help="the multi-process run stops halfway; one process resumes its last.ckpt (module docstring)")
    parser.add_argument("--trainer", default="ddp", choices=["ddp", "fsdp"],
                        help="the multi-process run's trainer config (default ddp; fsdp: sharded, same result)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. model=fma")
    args = parser.parse_args(argv)
    if args.devices < 2 or (args.batch_size % args.devices and not args.context_parallel):
        parser.error(f"--devices must be at least 2 and divide --batch-size ({args.devices}, {args.batch_size})")
    fixed = ("model.dropout=",) if args.context_parallel else ("objective=", "model.dropout=")
    if any(o.startswith(fixed) for o in args.overrides):
        parser.error(f"the check needs {'' if args.context_parallel else 'objective=clm and '}model.dropout=0 "
                     f"(module docstring): leave them out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    runs = {}
    for name, out, command in planned_runs(args):
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"{name}: train.py exited {done.returncode}", file=sys.stderr)
            return 1
        runs[name] = read_run(out)
    one, other = runs["one"], runs["ddp"]
    if args.resume:  # the one-process run over the resumed half
        one, other = {**one, **{key: {step: value for step, value in one[key].items() if step >= args.steps // 2}
                                for key in ("train_loss", "val_loss")}}, runs["resumed"]
    rows = compare_runs(one, other, rtol=args.rtol, atol=args.atol, weights_atol=args.weights_atol)
    print(report(rows, "resumed" if args.resume else "context-parallel" if args.context_parallel else "ddp"))
    failed = [r["quantity"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} agree" + (f"; differ: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
