"""The shared shell of every attention kind: projections in, heads, projection out."""

import torch
from torch import nn

from .errors import ConfigurationError


class AttentionLayer(nn.Module):
    """Multi-head self-attention with a kind-specific core.

    forward(x [batch, seq, dim], padding_mask [batch, seq] bool or None) -> [batch, seq, dim].
    `padding_mask` is True at padded positions: no query attends to them, and their own outputs
    are unspecified (finite). Subclasses implement `attend(q, k, v, padding_mask)` on
    `[batch, heads, seq, head_dim]` tensors; that keeps projections identical across kinds, so a
    comparison measures the attention and nothing else. A kind without a causal form (its keys mix
    every position) sets `has_causal_form = False` and says why in `why_no_causal_form`; causal=True
    is then refused with that reason.

    Decoding (causal only): `prefill(x)` runs a prompt in one parallel forward and returns its output
    and a decoding state; `step(x, state)` takes one more position. A state is a tuple of tensors,
    built by the kind's `decode_state(q, k, v)` and advanced by its `decode_step(q, k, v, state)`. The
    shell's own pair is exact for every causal kind and O(n) in memory: it keeps the projections of
    every position so far and runs the kind's `attend` over all of them for the new one (kinds
    without a state of their own use it: reformer, htransformer, fastmax, FMA with `conv`). Full,
    local and linear attention override it with a KV cache, a window of keys and an O(1) running
    sum, FMA with its fine blocks and a few summaries per level (fma/multipole/decode.py).
    """

    has_causal_form = True
    why_no_causal_form = ""

    def __init__(self, *, dim: int, num_heads: int, causal: bool):
        super().__init__()
        if num_heads < 1 or dim < 1 or dim % num_heads:
            raise ConfigurationError(
                f"model.dim={dim} must split into model.num_heads={num_heads} heads of equal width (both positive, "
                f"dim a multiple of num_heads); set model.dim= or model.num_heads=, e.g. model.dim=256 model.num_heads=4."
            )
        if causal and not self.has_causal_form:
            raise ConfigurationError(f"{self.why_no_causal_form} Train it as a masked LM with objective=mlm, or pick "
                                     f"a causal kind (e.g. model=fma or model=full).")
        self.dim, self.num_heads, self.causal = dim, num_heads, causal
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[batch, seq, dim] -> q, k, v, each [batch, heads, seq, head_dim]."""
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q, k, v, padding_mask):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.merge_heads(self.attend(*self.project(x), padding_mask))

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[batch, heads, seq, head_dim] -> the output projection, [batch, seq, dim]."""
        batch, _, seq, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, seq, self.dim))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """x [batch, n, dim] -> (forward(x), the decoding state after position n - 1)."""
        if not self.causal:
            raise ConfigurationError("Decoding token by token needs a causal model (objective=clm); this attention "
                                     "layer is bidirectional. Use a checkpoint trained with objective=clm.")
        q, k, v = self.project(x)
        return self.merge_heads(self.attend(q, k, v, None)), self.decode_state(q, k, v)

    def step(self, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """x [batch, 1, dim], the next position -> (its output [batch, 1, dim], the state after it)."""
        out, state = self.decode_step(*self.project(x), state)
        return self.merge_heads(out), state

    def decode_state(self, q, k, v) -> tuple:
        """The state after a prompt's q, k, v [batch, heads, n, head_dim]. Here: all three, O(n)."""
        return q, k, v

    def decode_step(self, q, k, v, state: tuple) -> tuple[torch.Tensor, tuple]:
        """q, k, v [batch, heads, 1, head_dim] of the next position -> (its attention output
        [batch, heads, 1, head_dim], the new state). Here: `attend` over every position so far, of
        which the last row is kept; exact because a causal output depends on no later position."""
        q, k, v = (torch.cat([past, new], dim=-2) for past, new in zip(state, (q, k, v)))
        return self.attend(q, k, v, None)[..., -1:, :], (q, k, v)


def check_length(n: int, max_seq_len: int, layer: str, why: str) -> None:
    """Refuse a sequence longer than a layer whose parameters stop at max_seq_len can take (`why`)."""
    if n > max_seq_len:
        raise ConfigurationError(
            f"Sequence length {n} exceeds the {layer} layer's max_seq_len={max_seq_len} ({why}); lower "
            f"data.seq_len= or raise model.attention.max_seq_len=."
        )
