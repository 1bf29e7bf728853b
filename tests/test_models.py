"""The language model, objectives, metric, schedule and checkpoint files, against hand-computed values."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_prefix_unchanged, compose_config
from fma import ATTENTION_KINDS, ConfigurationError, build_attention
from models import (IGNORE, AtomicCheckpointIO, CausalLM, LanguageModelMetric, LanguageModelModule, LastCheckpoint,
                    MaskedLM, TransformerLM)
from models.lit_module import warmup_cosine
from test_data import dead_pid

ALL_KINDS = sorted(ATTENTION_KINDS)
CAUSAL_KINDS = [kind for kind in ALL_KINDS if ATTENTION_KINDS[kind].has_causal_form]
# Small options that give every kind a multi-level structure at the test lengths.
KIND_OPTIONS = {
    "fastmax": {"chunk_size": 8},
    "linformer": {"k": 8, "max_seq_len": 64},
    "nystromformer": {"num_landmarks": 4, "conv_kernel_size": 3},
    "fma": {"block_size": 4, "rank": 2, "max_seq_len": 64},
    "reformer": {"n_hashes": 4, "n_buckets": 4, "chunk_size": 8, "fresh_rotations": False},
    "linear": {"chunk_size": 8},
    "local": {"window": 8},
    "htransformer": {"block_size": 4},
}


def tiny_lm(kind: str, causal: bool, vocab_size: int = 11, dropout: float = 0.0) -> TransformerLM:
    attention = {"name": kind, **KIND_OPTIONS.get(kind, {})}
    return TransformerLM(vocab_size=vocab_size, causal=causal, attention=attention, dim=32, depth=2,
                         num_heads=4, dropout=dropout)


@pytest.mark.parametrize("kind", ["full", "fma"])
def test_checkpointed_blocks_give_the_gradients_of_stored_ones(kind):
    """checkpoint_blocks=True recomputes each block in backward, with the same dropout masks: the loss
    and every gradient equal those of the stored activations (dropout on, same seed), and it saves
    memory (fewer tensors kept for backward)."""
    torch.manual_seed(0)
    net = tiny_lm(kind, causal=True, dropout=0.2).train()
    tokens = torch.randint(11, (2, 64))
    results = []
    for checkpointed in (False, True):
        net.checkpoint_blocks = checkpointed
        net.zero_grad()
        torch.manual_seed(1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = F.cross_entropy(net(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()], sum(saved)))
    (loss, grads, stored), (loss_c, grads_c, stored_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for grad_c, grad in zip(grads_c, grads):
        torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-7)
    assert stored_c < stored / 2


def test_metric_matches_hand_computation():
    metric = LanguageModelMetric("bpc")
    # Two batches of per-token NLLs: the metric must weigh tokens, not batches.
    metric.update(torch.tensor(3.0), torch.tensor(2), torch.tensor(1))
    metric.update(torch.tensor(1.0), torch.tensor(6), torch.tensor(5))
    values = metric.compute()
    assert values["loss"].item() == pytest.approx(4.0 / 8)
    assert values["bpc"].item() == pytest.approx(0.5 / math.log(2))
    assert values["acc"].item() == pytest.approx(6 / 8)
    ppl = LanguageModelMetric("ppl")
    ppl.update(torch.tensor(4.0), torch.tensor(8), torch.tensor(0))
    assert ppl.compute()["ppl"].item() == pytest.approx(math.exp(0.5))
    with pytest.raises(ValueError):
        LanguageModelMetric("accuracy")


def test_causal_objective_shifts_and_respects_first_target():
    tokens = torch.arange(12).view(2, 6)
    inputs, targets = CausalLM()({"tokens": tokens, "first_target": torch.tensor([0, 3])},
                                 mask_token_id=99, vocab_size=99)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]
    # Row 1 scores token positions >= 3 only: targets at input positions 2, 3, 4.
    assert targets.tolist() == [[1, 2, 3, 4, 5], [IGNORE, IGNORE, 9, 10, 11]]


def test_masked_objective_proportions_and_targets():
    vocab_size, mask_id = 50, 50
    tokens = torch.randint(vocab_size, (64, 4097), generator=torch.Generator().manual_seed(0))
    first_target = torch.full((64,), 100)
    generator = torch.Generator().manual_seed(1)
    inputs, targets = MaskedLM()({"tokens": tokens, "first_target": first_target}, mask_token_id=mask_id,
                                 vocab_size=vocab_size, generator=generator)
    source = tokens[:, :-1]
    selected = targets != IGNORE
    assert not selected[:, :100].any()                       # nothing before first_target
    assert torch.equal(targets[selected], source[selected])  # targets are the original tokens
    assert torch.equal(inputs[~selected], source[~selected])  # unselected inputs untouched
    n = selected[:, 100:].numel()
    assert selected.sum().item() / n == pytest.approx(0.15, abs=0.003)
    masked = (inputs == mask_id) & selected
    replaced = (inputs != mask_id) & (inputs != source) & selected
    # Random replacements that happen to draw the original token count as "kept": 10% * 1/50.
    assert masked.sum().item() / selected.sum().item() == pytest.approx(0.8, abs=0.01)
    assert replaced.sum().item() / selected.sum().item() == pytest.approx(0.1 * (1 - 1 / vocab_size), abs=0.01)
    assert (inputs == mask_id).sum() == masked.sum()           # the mask token appears only where selected


def test_warmup_cosine_schedule():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_whole_model_is_causal(kind):
    """Changing tokens after t leaves logits at and before t unchanged; gradients agree."""
    torch.manual_seed(0)
    model = tiny_lm(kind, causal=True).double().eval()
    seq_len, t = 37, 20
    tokens = torch.randint(11, (2, seq_len))
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(11, (2, seq_len - t - 1))
    assert not torch.equal(tokens, changed)
    logits, logits_changed = model(tokens), model(changed)
    assert_prefix_unchanged(kind, logits[:, : t + 1], logits_changed[:, : t + 1])
    assert not torch.allclose(logits[:, t + 1:], logits_changed[:, t + 1:])
    # Gradient of output t with respect to the (continuous) input embeddings after t is exactly zero.
    x = torch.randn(1, seq_len, 32, dtype=torch.float64, requires_grad=True)
    out = x
    for block in model.blocks:
        out = block(out)
    out[0, t].sum().backward()
    assert torch.all(x.grad[0, t + 1:] == 0)
    assert x.grad[0, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("kind, causal", [(kind, causal) for kind in ALL_KINDS for causal in (True, False)
                                          if kind in CAUSAL_KINDS or not causal])
def test_padding_mask_hides_padded_keys(kind, causal):
    """Outputs at real positions equal those of the sequence without its (right) padding."""
    torch.manual_seed(0)
    layer = build_attention(kind, dim=32, num_heads=4, causal=causal, **KIND_OPTIONS.get(kind, {})).double()
    real, padded = 21, 32
    x = torch.randn(2, padded, 32, dtype=torch.float64)
    padding_mask = torch.zeros(2, padded, dtype=torch.bool)
    padding_mask[:, real:] = True
    with_pad = layer(x, padding_mask)[:, :real]
    without = layer(x[:, :real])
    torch.testing.assert_close(with_pad, without, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(layer(x, padding_mask)).all()


@pytest.mark.parametrize("kind", sorted(set(ALL_KINDS) - set(CAUSAL_KINDS)))
def test_kinds_without_a_causal_form_refuse_causal(kind):
    with pytest.raises(ConfigurationError, match="objective=mlm"):
        build_attention(kind, dim=32, num_heads=4, causal=True, **KIND_OPTIONS.get(kind, {}))


def test_fma_downsampled_queries_from_the_configs(tmp_path):
    """model=fma objective=mlm model.attention.downsample_queries=true composes, builds as train.py
    builds it, and trains (forward and backward reach every parameter); with objective=clm the layer
    refuses and names both fixes."""
    import hydra

    overrides = ["model=fma", "model.attention.block_size=4", "model.attention.downsample_queries=true"]
    cfg = compose_config(tmp_path, [*overrides, "objective=mlm"])
    objective = hydra.utils.instantiate(cfg.objective)
    torch.manual_seed(0)
    net = hydra.utils.instantiate(cfg.model, vocab_size=11, causal=objective.causal, _convert_="all")
    assert not objective.causal and net.blocks[0].attention.downsample_queries
    batch = {"tokens": torch.randint(11, (2, cfg.data.seq_len + 1)), "first_target": torch.zeros(2, dtype=torch.long)}
    inputs, targets = objective(batch, mask_token_id=11, vocab_size=11, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(net(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters() if p.requires_grad)
    options = dict(compose_config(tmp_path, [*overrides, "objective=clm"]).model.attention)
    with pytest.raises(ConfigurationError, match=r"objective=mlm.*model\.attention\.downsample_queries=false"):
        build_attention(options.pop("name"), dim=32, num_heads=2, causal=True, **options)


def test_full_layer_matches_softmax_formula():
    torch.manual_seed(0)
    layer = build_attention("full", dim=16, num_heads=2, causal=True).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    q, k, v = layer.project(x)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    expected = layer.proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(3, 9, 16))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, objective", [(kind, objective) for kind in ALL_KINDS
                                              for objective in (CausalLM(), MaskedLM(mask_prob=0.3))
                                              if kind in CAUSAL_KINDS or not objective.causal])
def test_tiny_model_overfits_one_batch(kind, objective):
    """A few hundred Adam steps on one fixed batch drive the loss far below chance (ln 11 = 2.40)."""
    torch.manual_seed(0)
    model = tiny_lm(kind, causal=objective.causal)
    batch = {"tokens": torch.randint(11, (4, 33)), "first_target": torch.zeros(4, dtype=torch.long)}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        inputs, targets = objective(batch, mask_token_id=11, vocab_size=11, generator=generator.manual_seed(0))
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize("loss_chunk_tokens", [None, 7])
@pytest.mark.parametrize("objective", [CausalLM(), MaskedLM()])
def test_module_loss_and_metric_match_cross_entropy_over_all_logits(objective, loss_chunk_tokens):
    """The module's summed loss, its gradients and its evaluation metric equal cross-entropy over the
    full logits with IGNORE: whether the head ran everywhere or only at the scored positions (masked
    LM), all at once or in chunks recomputed in backward."""
    torch.manual_seed(0)
    net = tiny_lm("full", causal=objective.causal).double()
    module = LanguageModelModule(net, objective, metric="ppl", optim={}, loss_chunk_tokens=loss_chunk_tokens)
    batch = {"tokens": torch.randint(11, (3, 41)), "first_target": torch.tensor([0, 5, 30])}
    # Evaluation draws its masks from a generator seeded by the batch index (0 here, with seed 0).
    inputs, targets = objective(batch, mask_token_id=11, vocab_size=11, generator=torch.Generator().manual_seed(0))
    scored = targets != IGNORE
    all_logits = net(inputs)
    expected = F.cross_entropy(all_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    expected.backward()
    expected_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    features, module_targets, _ = module._features_and_targets(batch, torch.Generator().manual_seed(0))
    assert features.shape == ((int(scored.sum()) if objective.sparse_targets else 3 * 40), 32)
    loss_sum = module._nll_sum(features, module_targets)
    torch.testing.assert_close(loss_sum.double(), expected.detach(), rtol=1e-5, atol=0)
    loss_sum.backward()
    for parameter, expected_grad in zip(net.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, expected_grad, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        module._eval_step(batch, 0, module.val_metric)
    values = module.val_metric.compute()
    torch.testing.assert_close(values["loss"].double(), expected.detach() / scored.sum(), rtol=1e-5, atol=0)
    accuracy = (all_logits[scored].argmax(-1) == targets[scored]).double().mean()
    torch.testing.assert_close(values["acc"].double(), accuracy, rtol=1e-12, atol=0)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_optimizer_is_clipped_like_lightning_clips_the_others(algorithm):
    """Lightning refuses to clip for fused AdamW; the module clips it itself: by norm, the gradients scaled
    to total norm 0.5 (from 13: 3, 4 and 12), by value each one clamped to +-0.5."""
    module = LanguageModelModule(tiny_lm("full", causal=True), CausalLM(), metric="ppl", optim={})
    parameters = list(module.parameters())
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    parameters[0].grad.view(-1)[:2] = torch.tensor([3.0, -4.0])
    parameters[1].grad.view(-1)[0] = 12.0
    expected = [p.grad * 0.5 / 13 if algorithm == "norm" else p.grad.clamp(-0.5, 0.5) for p in parameters]
    module.configure_gradient_clipping(torch.optim.AdamW(parameters, fused=True), 0.5, algorithm)
    for parameter, grad in zip(parameters, expected):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-6, atol=0)


def test_loss_chunk_tokens_must_be_positive():
    with pytest.raises(ConfigurationError, match="loss_chunk_tokens="):
        LanguageModelModule(tiny_lm("full", causal=True), CausalLM(), metric="bpc", optim={}, loss_chunk_tokens=0)


OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 1, "min_lr_ratio": 0.1}


@pytest.mark.parametrize("max_steps, total_steps, named", [(0, None, "trainer.max_steps=0"),
                                                           (-1, None, "trainer.max_steps=-1"),
                                                           (5, 0, "optim.total_steps=0")])
def test_schedule_length_must_be_positive(max_steps, total_steps, named):
    """The LR schedule ends at optim.total_steps, or else trainer.max_steps: the message names the one used."""
    import lightning as L

    from data import SyntheticDataModule

    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigurationError, match=f"{named} must be a positive number of steps"):
        module = LanguageModelModule(tiny_lm("full", causal=True), CausalLM(), metric="ppl",
                                     optim={**OPTIM, "total_steps": total_steps})
        trainer.fit(module, SyntheticDataModule(seq_len=8, batch_size=2))


def test_checkpoint_folder_use_removes_temporary_files_of_dead_writers(tmp_path):
    """A run SIGKILLed while saving leaves last.ckpt.<pid>...tmp; saving into or loading from its
    folder (a resume) removes it, but never the temporary file of a live process."""
    checkpoint = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    for use in ("save", "load"):
        stale = tmp_path / f"last.ckpt.{dead_pid()}@{socket.gethostname()}.0badcafe.tmp"
        live = tmp_path / f"best.ckpt.{os.getpid()}.0badcafe.tmp"
        stale.write_bytes(b"partial")
        live.write_bytes(b"partial")
        if use == "save":
            io.save_checkpoint({"step": 1}, checkpoint)
        else:
            assert io.load_checkpoint(checkpoint, weights_only=True) == {"step": 1}
        assert not stale.exists() and live.exists(), use


@pytest.mark.parametrize("every", [0.5, 0, None])
def test_last_checkpoint_interval_must_be_whole_steps(every):
    """A fraction (Lightning's epoch-relative val_check_interval) would save last.ckpt at every step."""
    with pytest.raises(ConfigurationError, match="every_n_train_steps="):
        LastCheckpoint("last.ckpt", every)
