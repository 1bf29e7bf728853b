"""Decoding: prefill + step give the logits of one forward, states of the sizes stated, sampling as
defined, and generate.py from a trained checkpoint to streamed text, or one paragraph and exit 2."""

import subprocess
import sys

import pytest
import torch

import generate as generate_py
from conftest import ROOT, compose_config
from fma import ATTENTION_KINDS, ConfigurationError
from fma.multipole.decode import max_numel
from generate import generate, sample
from models import TransformerLM
from train import train

CAUSAL_KINDS = sorted(kind for kind in ATTENTION_KINDS if ATTENTION_KINDS[kind].has_causal_form)
M = 4  # FMA's and H-Transformer's finest block; the other kinds' blocks, chunks and windows are as small
KIND_OPTIONS = {
    "fastmax": {"chunk_size": M},
    "fma": {"block_size": M, "rank": 2, "max_seq_len": 64},
    "htransformer": {"block_size": M},
    "linear": {"chunk_size": M},
    "local": {"window": M + 1},
    "reformer": {"n_hashes": 2, "n_buckets": 4, "chunk_size": M},
}
# Prompt lengths: 1, m - 1, m, 2m + 1, 4m, just past FMA's level boundary at 4m, about 5m; each steps on to
# 5m + 1, so that the steps cross blocks, chunks, windows and the level boundary too.
PROMPT_LENGTHS = (1, M - 1, M, 2 * M + 1, 4 * M, 4 * M + 1, 5 * M)
TOTAL = 5 * M + 1
TEXT = "Once upon a time, a small café served crème brûlée to everyone — naïve or not. " * 40


def tiny_lm(kind: str) -> TransformerLM:
    torch.manual_seed(0)
    net = TransformerLM(vocab_size=11, causal=True, attention={"name": kind, **KIND_OPTIONS.get(kind, {})}, dim=32,
                        depth=2, num_heads=2)
    return net.double().eval()


def decoded(net: TransformerLM, tokens: torch.Tensor, prompt_length: int) -> tuple[torch.Tensor, list]:
    """Logits of prefill(tokens[:, :prompt_length]) and then one step per token, [batch, n, vocab];
    and the state after every position from the prompt's last on."""
    logits, state = net.prefill(tokens[:, :prompt_length])
    rows, states = [logits], [state]
    for position in range(prompt_length, tokens.shape[1]):
        logits, state = net.step(tokens[:, position], state)
        rows.append(logits[:, None])
        states.append(state)
    return torch.cat(rows, dim=1), states


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefill_then_step_gives_the_logits_of_one_forward(kind):
    net = tiny_lm(kind)
    tokens = torch.randint(11, (2, TOTAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(tokens)
        for prompt_length in PROMPT_LENGTHS:
            logits, _ = decoded(net, tokens, prompt_length)
            torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-12, msg=f"{kind}, prompt {prompt_length}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_prefill_then_step_in_low_precision(kind, dtype, tolerance):
    """fp32 and bf16 (on the CPU): prefill then steps, against the float64 forward of the same weights,
    by relative error over all logits (the forward in that dtype meets the same bound)."""
    net = tiny_lm(kind)
    tokens = torch.randint(11, (2, TOTAL), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(tokens)
        net = net.to(dtype)
        logits, _ = decoded(net, tokens, 2 * M + 1)
        assert logits.dtype == dtype
        assert relative_error(net(tokens), expected) < tolerance
        assert relative_error(logits, expected) < tolerance, kind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["full", "local", "linear", "fma"])
def test_gpu_prefill_then_step_in_bf16(kind):
    """On the GPU in bf16 (FMA's forward on its fused kernels, its steps on the torch state): against the
    float64 forward on the CPU, n = 300 across FMA's blocks and levels (m = 16)."""
    torch.manual_seed(0)
    options = {"fma": {"block_size": 16, "max_seq_len": 512}, "local": {"window": 17}, "linear": {"chunk_size": 16}}
    net = TransformerLM(vocab_size=11, causal=True, attention={"name": kind, **options.get(kind, {})}, dim=64,
                        depth=2, num_heads=2).double().eval()
    tokens = torch.randint(11, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(tokens)
        net = net.to("cuda", torch.bfloat16)
        logits, _ = decoded(net, tokens.cuda(), 100)
    assert relative_error(logits.cpu(), expected) < 1e-2


def state_numel(state: tuple) -> int:
    return sum(t.numel() for t in state if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("kind, numel, exact", [
    ("full", lambda n, d: 2 * (n + 1024) * d, False),    # a KV cache with room (capacity < 1.25 n + 1024)
    ("local", lambda n, d: 2 * min(n, M) * d, True),     # the last window - 1 keys and values
    ("linear", lambda n, d: (d + 1) * d, True),          # sum phi(k) v^T and sum phi(k)
    # fine keys of two blocks and a few summaries per level: at most this, whatever n (3 levels at max_seq_len 64)
    ("fma", lambda n, d: max_numel(M, 2, d, num_levels=3), False),
])
def test_decoding_states_hold_the_sizes_stated(kind, numel, exact):
    """Per batch row and head, for every length from the prompt on (head_dim d = 16)."""
    net = tiny_lm(kind)
    with torch.no_grad():
        _, states = decoded(net, torch.randint(11, (1, TOTAL)), 1)
    for n, state in enumerate(states, start=1):
        assert state.length == n
        sizes, expected = [state_numel(layer) for layer in state.layers], 2 * numel(n, 16)
        assert all(size == expected if exact else 0 < size <= expected for size in sizes), (kind, n, sizes)


PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def support(draws: int = 4000, seed: int = 0, **settings) -> set[int]:
    logits = PROBS.log().expand(draws, -1)
    return set(sample(logits, generator=torch.Generator().manual_seed(seed), **settings).tolist())


def test_sampling_with_a_seed_is_reproducible():
    settings = dict(temperature=0.8, top_k=0, top_p=1.0)
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    first, again, other = (sample(logits, generator=torch.Generator().manual_seed(seed), **settings)
                           for seed in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("settings, kept", [
    (dict(temperature=1.0, top_k=0, top_p=1.0), {0, 1, 2, 3, 4}),
    (dict(temperature=0.0, top_k=0, top_p=1.0), {0}),       # greedy
    (dict(temperature=1.0, top_k=2, top_p=1.0), {0, 1}),
    (dict(temperature=1.0, top_k=0, top_p=0.4), {0}),       # 0.5 alone reaches 0.4
    (dict(temperature=1.0, top_k=0, top_p=0.75), {0, 1, 2}),  # 0.5 + 0.2 < 0.75 <= 0.85
    (dict(temperature=1.0, top_k=2, top_p=0.75), {0, 1}),   # top_k cuts first
])
def test_top_k_and_top_p_restrict_the_support(settings, kept):
    assert support(**settings) == kept


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished causal runs on a small UTF-8 text, byte-level and BPE: their best checkpoints."""
    done = {}
    for tokenizer in ("byte", "bpe"):
        tmp_path = tmp_path_factory.mktemp(tokenizer)
        (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
        overrides = ["data=text", f"data.path={tmp_path / 'text.txt'}", f"data.tokenizer={tokenizer}",
                     "data.vocab_size=300", "trainer.max_steps=3", "test=false"]
        train(compose_config(tmp_path, overrides))
        done[tokenizer] = tmp_path / "run" / "checkpoints" / "best.ckpt"
    return done


class Written(list):
    """A stream that records each write."""

    def write(self, text):
        self.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_generate_streams_a_reproducible_continuation(runs, tokenizer):
    arguments = [f"ckpt_path={runs[tokenizer]}", "prompt=Once upon a café,", "max_new_tokens=12", "top_k=20",
                 "top_p=0.9", "seed=3"]
    out = Written()
    text = generate(arguments, out=out)
    assert out[0] == "Once upon a café," and "".join(out[1:]) == text + "\n"
    assert len(out) == 12 + 2   # the prompt, one write per token, the end
    assert generate(arguments, out=Written()) == text


def test_generate_command_line_runs_end_to_end(runs, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A small crème", encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "generate.py"), f"ckpt_path={runs['byte']}",
                           f"prompt_file={prompt}", "max_new_tokens=20", "temperature=0"],
                          capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("A small crème") and len(done.stdout) > len("A small crème")


def rewritten(path, tmp_path, **config) -> str:
    """A copy of the checkpoint at `path` whose recorded config has `config`'s sections instead."""
    saved = torch.load(path, weights_only=True)
    saved["hyper_parameters"]["config"].update(config)
    torch.save(saved, tmp_path / "rewritten.ckpt")
    return str(tmp_path / "rewritten.ckpt")


def test_generate_refuses_what_it_cannot_continue(runs, tmp_path, monkeypatch):
    byte = f"ckpt_path={runs['byte']}"
    masked = rewritten(runs["byte"], tmp_path, objective={"_target_": "models.MaskedLM"})
    with pytest.raises(ConfigurationError, match="masked LM"):
        generate([f"ckpt_path={masked}", "prompt=abc"], out=Written())
    synthetic = rewritten(runs["byte"], tmp_path, data={"_target_": "data.SyntheticDataModule", "task": "copy",
                                                       "seq_len": 32, "batch_size": 4})
    with pytest.raises(ConfigurationError, match="no text tokenizer"):
        generate([f"ckpt_path={synthetic}", "prompt=abc"], out=Written())
    with pytest.raises(ConfigurationError, match="prompt is empty"):
        generate([byte, "prompt="], out=Written())
    with pytest.raises(ConfigurationError, match="top_p must lie"):
        generate([byte, "prompt=abc", "top_p=0"], out=Written())
    real = generate_py.run_tokenizer
    monkeypatch.setattr(generate_py, "run_tokenizer",
                        lambda datamodule: generate_py.TextTokenizer(lambda text: [300], real(datamodule).token_bytes))
    with pytest.raises(ConfigurationError, match="outside the model's vocabulary"):
        generate([byte, "prompt=abc"], out=Written())


def test_generate_ends_a_mistake_with_one_paragraph_and_exit_2(runs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["generate.py", f"ckpt_path={runs['byte']}", "prompt="])
    with pytest.raises(SystemExit) as ended:
        generate_py.main()
    assert ended.value.code == 2 and "error: The prompt is empty" in capsys.readouterr().err
