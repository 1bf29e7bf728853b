"""A pre-norm transformer language model whose attention layer is chosen by name.

Positions: fixed sinusoidal embeddings added to the token embeddings (Vaswani et al.). They are the
one scheme that works unchanged for every attention kind: rotary and ALiBi act on each query-key
pair, which kinds that summarise keys (FMA's coarse levels, H-Transformer-1D's averages) or
replace the softmax (linear attention) never form. Sinusoids have no length limit and no
parameters, so a model can be evaluated at any `seq_len`.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fma import build_attention

EMBEDDING_STD = 0.02  # GPT-2's initial scale of token embeddings


def sinusoidal_positions(seq_len: int, dim: int, device=None, start: int = 0) -> torch.Tensor:
    """[seq_len, dim] float32 for positions start … start + seq_len - 1: sin on even channels, cos on
    odd, wavelengths 2π … 10000·2π."""
    position = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(nn.functional.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)): pre-norm keeps deep stacks stable."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, causal: bool, attention: dict):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = build_attention(**attention, dim=dim, num_heads=num_heads, causal=causal)
        self.attention_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout)

    def forward(self, x):
        return self.after_attention(x, self.attention(self.attention_norm(x)))

    def prefill(self, x):
        """forward(x) and the attention's decoding state."""
        attended, state = self.attention.prefill(self.attention_norm(x))
        return self.after_attention(x, attended), state

    def step(self, x, state):
        """x [batch, 1, dim], the next position, and the state before it -> (output, the state after it)."""
        attended, state = self.attention.step(self.attention_norm(x), state)
        return self.after_attention(x, attended), state

    def after_attention(self, x, attended):
        x = x + self.attention_dropout(attended)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class DecodingState:
    """Where decoding stands: `length` tokens seen (the next one's position), each block's attention state."""

    length: int
    layers: list[tuple]


class TransformerLM(nn.Module):
    """tokens [batch, seq] -> logits [batch, seq, vocab_size].

    The embedding has one extra row, id `vocab_size` (`mask_token_id`), reserved for masked LM, so
    checkpoints have the same shapes for both objectives. The output head is tied to the first
    `vocab_size` rows. `attention` is `{"name": kind, **options}` for `fma.build_attention`.
    `checkpoint_blocks`: in training, each block's activations are recomputed in backward rather than
    stored, so that memory holds one block's activations and every block's input: what lets a step of
    a million tokens fit on one GPU.

    Decoding (causal, in eval mode): `prefill(tokens)` then `step(token, state)` give the logits that
    one forward over the whole sequence gives, position by position; each attention kind keeps its
    own state (fma/layer.py).
    """

    def __init__(self, *, vocab_size: int, causal: bool, attention: dict, dim: int = 256, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.1, checkpoint_blocks: bool = False):
        super().__init__()
        self.vocab_size, self.dim, self.checkpoint_blocks = vocab_size, dim, checkpoint_blocks
        self.mask_token_id = vocab_size
        self.embedding = nn.Embedding(vocab_size + 1, dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, dropout, causal, dict(attention)) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int):
        # GPT-2 scheme; the projections that write into the residual stream shrink with depth.
        # Parameters an attention kind owns besides Linear layers (e.g. FMA's basis) keep their own init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * depth))
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_STD)

    def forward(self, tokens: torch.Tensor, head: bool = True) -> torch.Tensor:
        """`head=False`: the final features [batch, seq, dim] instead of logits, for a loss that applies
        `self.head` itself, only where targets are scored or a chunk at a time (at a large vocabulary
        the head is the layer with the most FLOPs)."""
        x = self.embed(tokens)
        for block in self.blocks:
            # non-reentrant checkpointing replays the block's dropout masks (it restores the RNG state)
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        x = self.final_norm(x)
        return self.head(x) if head else x

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [batch, seq] at positions start … -> [batch, seq, dim]."""
        # Positions at the token embeddings' initial scale (sinusoids have RMS 1/sqrt(2) per channel).
        # A larger token scale would make the tied head predict "next = current" at initialisation.
        positions = sinusoidal_positions(tokens.shape[1], self.dim, tokens.device, start)
        positions = positions * (EMBEDDING_STD * math.sqrt(2))
        return self.embedding_dropout(self.embedding(tokens) + positions.to(self.embedding.weight.dtype))

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodingState]:
        """A prompt, tokens [batch, n], in one parallel forward -> (logits [batch, n, vocab_size], the state)."""
        x, layers = self.embed(tokens), []
        for block in self.blocks:
            x, state = block.prefill(x)
            layers.append(state)
        return self.head(self.final_norm(x)), DecodingState(tokens.shape[1], layers)

    def step(self, token: torch.Tensor, state: DecodingState) -> tuple[torch.Tensor, DecodingState]:
        """The next tokens, [batch] or [batch, 1] -> (their logits [batch, vocab_size], the state after them)."""
        x, layers = self.embed(token.reshape(-1, 1), start=state.length), []
        for block, block_state in zip(self.blocks, state.layers):
            x, block_state = block.step(x, block_state)
            layers.append(block_state)
        return self.head(self.final_norm(x))[:, 0], DecodingState(state.length + 1, layers)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> logits [..., vocab_size], tied to the token embeddings."""
        return features @ self.embedding.weight[: self.vocab_size].T
