"""train.py's context_parallel=true (models/lit_module.py, data/base.py): on 2 gloo processes the module's
training loss, averaged over the ranks, and the parameter gradients DDP's average gives equal one process's
on the whole sequences (float64, 1e-12), causal LM and masked LM, with ranks that score unequal counts, blocks
recomputed in backward too; the
data module gives every rank the same rows; the refusals. End to end through train.py (2 CPU processes against
1: every step's loss, val/test loss, the final weights), here with forked processes, through train.py's own
launcher with `python scripts/check_ddp.py --context-parallel`."""

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, compose_config
from distributed_testing import spawn
from data import SyntheticDataModule
from fma import ConfigurationError
from fma.context_parallel import check_model
from models import CausalLM, LanguageModelModule, MaskedLM, TransformerLM
from train import train

sys.path.insert(0, str(ROOT / "scripts"))
import check_ddp  # noqa: E402

N, VOCAB, TOLERANCE = 32, 16, dict(rtol=0, atol=1e-12)
OPTIM = dict(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=2, total_steps=10, min_lr_ratio=0.1)


def tiny_module(objective, kind="groupedconv", checkpoint_blocks=False, **options) -> LanguageModelModule:
    torch.manual_seed(0)
    attention = dict(name="fma", block_size=4, rank=2, downsample=kind, backend="torch", max_seq_len=N)
    net = TransformerLM(vocab_size=VOCAB, causal=objective.causal, attention=attention, dim=16, depth=2,
                        num_heads=2, dropout=0.0, checkpoint_blocks=checkpoint_blocks).double()
    module = LanguageModelModule(net, objective, metric="ppl", optim=OPTIM, context_parallel=True, **options)
    module._head_nll = lambda features, targets: module._nll(module.net.head(features), targets)  # float64, not 32
    return module


def check_step(rank, world, *, objective, kind, checkpoint_blocks=False):
    module = tiny_module(objective, kind, checkpoint_blocks)
    generator = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(VOCAB, (3, N + 1), generator=generator),
             "first_target": torch.tensor([0, 20, 27])}  # the first rank scores fewer targets than the last

    torch.default_generator.manual_seed(module._step_seed(0))  # what on_train_batch_start does on one process
    expected = module.training_loss(batch)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()

    module.use_context_parallel(dist.group.WORLD)
    torch.default_generator.manual_seed(module._step_seed(rank))  # dropout's draws: per rank
    loss = module.training_loss(batch)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, expected.detach(), **TOLERANCE)
    for name, parameter in module.named_parameters():  # DDP: the mean of the ranks' gradients
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / world, expected_grads[name], **TOLERANCE, msg=name)


def test_two_ranks_loss_and_gradients_equal_one_process(tmp_path):
    checks = [(check_step, dict(objective=CausalLM(), kind="groupedconv")),
              (check_step, dict(objective=MaskedLM(), kind="multilevel")),
              (check_step, dict(objective=CausalLM(), kind="avgpool", checkpoint_blocks=True))]  # recomputed blocks
    spawn(2, checks, tmp_path)


def test_every_rank_gets_the_rows_of_one_process():
    data = SyntheticDataModule(seq_len=N, batch_size=2, num_val=5, num_test=5)

    def rows_at_step_3(rank, world, same):
        data.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1, global_rank=rank, world_size=world,
                                       strategy=SimpleNamespace(root_device=torch.device("cpu")))
        data.same_rows_on_every_rank = same
        return next(iter(data.train_dataloader()))["tokens"], torch.cat([b["tokens"] for b in data.val_dataloader()])

    rows = {(rank, same): rows_at_step_3(rank, 2, same) for rank in (0, 1) for same in (False, True)}
    one = rows_at_step_3(0, 1, False)
    for rank in (0, 1):
        for got, want in zip(rows[rank, True], one):
            assert torch.equal(got, want)
    assert not torch.equal(rows[0, False][0], rows[1, False][0]) and len(rows[0, False][1]) == 3  # DDP: shares


def test_refusals(tmp_path):
    with pytest.raises(ConfigurationError, match="compile=True"):
        tiny_module(CausalLM(), compile=True)
    net = TransformerLM(vocab_size=VOCAB, causal=True, attention=dict(name="full"), dim=16, depth=1, num_heads=2)
    with pytest.raises(ConfigurationError, match="FMA only"):
        LanguageModelModule(net, CausalLM(), metric="ppl", optim=OPTIM, context_parallel=True)
    fma_net = tiny_module(CausalLM()).net
    check_model(fma_net, N, 2)
    with pytest.raises(ConfigurationError, match="multiple of 3"):
        check_model(fma_net, N, 3)
    with pytest.raises(ConfigurationError, match="padded_length"):  # chunks of 2 tokens: not whole blocks of 4
        check_model(fma_net, N, 16)
    cfg = compose_config(tmp_path, ["context_parallel=true", "model=fma"])
    assert cfg.context_parallel is True


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_train_py_two_processes_equal_one(tmp_path, objective):
    """train.py, 6 steps (validation at 3 and 6) of one process and of context_parallel=true over 2 CPU processes
    (forked from this one: trainer.strategy=ddp_fork, trainer=ddp but for the launcher; test=false, as the forked
    test would rewrite the csv log): every step's loss, val/loss and the final weights agree (fp32, check_ddp's
    tolerances)."""
    common = ["trainer.precision=32-true", "model.dropout=0.0", f"objective={objective}", "test=false",
              *check_ddp.CONTEXT_PARALLEL]
    runs = {}
    for name, extra in (("one", []), ("split", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                                "trainer.strategy=ddp_fork", "context_parallel=true"])):
        out = tmp_path / name
        cfg = compose_config(out, [*common, *extra, "+callbacks.global_loss._target_=check_ddp.GlobalLoss",
                                   f"+callbacks.global_loss.path={out / 'run' / check_ddp.LOSSES_FILE}"])
        train(cfg)
        runs[name] = check_ddp.read_run(out / "run")
    rows = check_ddp.compare_runs(runs["one"], runs["split"], rtol=1e-5, atol=1e-6, weights_atol=2e-5)
    assert len(rows) == 6 + 2 + 1 and all(row["ok"] for row in rows), check_ddp.report(rows, "context-parallel")


@pytest.mark.parametrize("context_parallel, counted", [(False, 2 * 3 * 7), (True, 3 * 7)])
def test_throughput_counts_each_sequence_once(context_parallel, counted):
    """train/tokens_per_s's token count on 2 ranks, batch 3 x 8 tokens (7 predicted each): DDP's ranks hold
    different rows (both counted), context parallelism's the same rows (counted once)."""
    from models.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor()
    trainer = SimpleNamespace(world_size=2, _logger_connector=SimpleNamespace(should_update_logs=False))
    module = SimpleNamespace(context_parallel=context_parallel, device=torch.device("cpu"))
    monitor.on_train_batch_end(trainer, module, None, {"tokens": torch.zeros(3, 8, dtype=torch.long)}, 0)
    assert monitor._ends[-1][1] == counted
