"""Sliding-window attention, and the block-local pieces that other kinds build on.

`window` = w, exactly:
- causal: query i sees keys j with i - w < j <= i (w tokens: itself and the w - 1 before it);
- bidirectional: query i sees keys j with |i - j| < w (w - 1 tokens each side and itself).
A window of at least n is full attention.

Computed block-wise: the sequence is cut into blocks of w queries; each block gathers its own keys,
the previous block's and (bidirectional) the next block's, and masks them to the exact window. Memory
is O(n * w) per head; the n x n matrix never exists.

The helpers below keep a softmax split in pieces (row max, numerator, denominator), so that kinds
whose key set is a union of parts (H-Transformer-1D's levels, Reformer's hashing rounds) normalise
once over the union instead of once per part.
"""

import functools

import torch

from .errors import ConfigurationError
from .layer import AttentionLayer
from .registry import register_attention


def block_neighbourhoods(n: int, block: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions for attention between neighbouring blocks.

    Returns query positions [blocks, block] and key positions [blocks, keys]: the previous block,
    the own block and, unless causal, the next one (just the own block when there is one block).
    The last block's query positions past n - 1 repeat n - 1, so every row has a real query; key
    positions outside [0, n) are for the caller to mask.
    """
    blocks = -(-n // block)
    positions = torch.arange(blocks * block, device=device).view(blocks, block)
    shifts = (0,) if blocks == 1 else (-1, 0) if causal else (-1, 0, 1)
    keys = torch.cat([positions + shift * block for shift in shifts], dim=1)
    return positions.clamp(max=n - 1), keys


def at_positions(x: torch.Tensor, positions: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """x indexed along `dim` by `positions` (any shape, clamped into range): that dim becomes positions.shape."""
    index = positions.clamp(0, x.shape[dim] - 1)
    return x.index_select(dim, index.flatten()).unflatten(dim, index.shape)


def exp_scores(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One piece of a softmax: scores [..., keys] and a broadcastable visibility mask ->
    row max [..., 1], weights exp(score - max) [..., keys] (0 where hidden), row sum [..., 1], all
    in at least float32 (bf16 and fp16 scores are upcast; callers cast the output back).

    A row with nothing visible gets sum 0 and the lowest finite max, so it drops out of
    `merge_pieces` instead of producing NaN. The max is a constant shift: it carries no gradient.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~visible, float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - row_max)
    return row_max, weights, weights.sum(-1, keepdim=True)


def merge_pieces(maxima: torch.Tensor, numerators: torch.Tensor, denominators: torch.Tensor, dim: int) -> torch.Tensor:
    """Finish a softmax whose key set was split into pieces along `dim`: rescale every piece to the
    shared max, then one division. maxima/denominators [..., 1], numerators [..., d]."""
    scale = torch.exp(maxima - maxima.amax(dim, keepdim=True))
    return (numerators * scale).sum(dim) / (denominators * scale).sum(dim)


def neighbour_block_attention(q, k, v, *, block: int, causal: bool, window: int, padding_mask=None):
    """Softmax pieces of attention among neighbouring blocks, restricted to a window.

    q, k, v [batch, heads, n, d]. Query i sees key j when j lies in the previous, own or
    (bidirectional) next block of `block` positions, i - window < j <= i (causal) or
    |i - j| < window (bidirectional), and j is not padding (a query always sees itself, so no row
    is empty). Returns the pieces of `exp_scores`: row max [b, h, n, 1], numerator [b, h, n, d],
    denominator [b, h, n, 1].
    """
    n = q.shape[-2]
    queries, keys = block_neighbourhoods(n, block, causal, q.device)
    offset = queries[:, :, None] - keys[:, None, :]  # query minus key position, [blocks, block, keys]
    visible = ((keys >= 0) & (keys < n))[:, None, :] & (offset < window) & (offset > (-1 if causal else -window))
    if padding_mask is not None:
        real_key = ~at_positions(padding_mask, keys, dim=-1)  # [batch, blocks, keys]
        visible = visible & (real_key[:, None, :, None, :] | (offset == 0))
    scores = at_positions(q, queries) @ at_positions(k, keys).transpose(-1, -2) * q.shape[-1] ** -0.5
    row_max, weights, row_sum = exp_scores(scores, visible)
    numerator = weights.to(v.dtype) @ at_positions(v, keys)
    return tuple(piece.flatten(2, 3)[:, :, :n] for piece in (row_max, numerator, row_sum))


@register_attention("local")
class LocalAttention(AttentionLayer):
    """Sliding-window softmax attention; `window` = w as defined in the module docstring.

    The default w = 128 = 2m for FMA's default m = 64: at least FMA's fine near field on every side.
    """

    def __init__(self, *, dim: int, num_heads: int, causal: bool, window: int = 128):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if window < 1:
            raise ConfigurationError(
                f"window={window} must be at least 1 (the query itself); set model.attention.window=."
            )
        self.window = window

    def attend(self, q, k, v, padding_mask):
        if q.is_cuda and padding_mask is None:
            return flex_sliding_window(q, k, v, window=self.window, causal=self.causal)
        _, numerator, denominator = neighbour_block_attention(
            q, k, v, block=min(self.window, q.shape[-2]), causal=self.causal, window=self.window,
            padding_mask=padding_mask,
        )
        return (numerator / denominator).to(q.dtype)


@functools.lru_cache(maxsize=16)
def sliding_window_block_mask(n: int, window: int, causal: bool, device: torch.device):
    """FlexAttention block mask of the window (built once per shape, compiled: never n x n)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(batch, head, query, key):
        offset = query - key
        return (offset >= 0) & (offset < window) if causal else (offset < window) & (offset > -window)

    return create_block_mask(visible, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, _compile=True)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sliding_window(q, k, v, *, window: int, causal: bool):
    """The GPU path: FlexAttention skips every key block outside the window and masks only the
    partial ones, so time and memory stay O(n * window) like the block-wise path (which the tests
    hold it to on the GPU)."""
    block_mask = sliding_window_block_mask(q.shape[-2], window, causal, q.device)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask)
