"""The learned basis: how a cell's tokens become its p coarse keys (or values) at each level.

Kinds (shared/docs/fma-algorithm.md), all shared across heads, one set of parameters per level:
- groupedconv: per channel, p filters of length w_l plus a bias; K~[cell, r, c] = b[r, c] +
  sum_t W[r, t, c] K[cell*w_l + t, c]. Parameters W [p, w_l, d], b [p, d].
- conv: the same with channel mixing; K~[cell, r, o] = b[r, o] + sum_{t,c} W[r, t, c, o] K[.., c].
  Parameters W [p, w_l, d, d], b [p, d].
- avgpool: the p summaries are means of w_l / p consecutive tokens; nothing is learned.
A summary mixes only tokens of its own cell, which keeps the causal version leak-free.

groupedconv and avgpool also have a fused Triton path (fma/triton_downsample.py: all levels in one
pass over x, forward and backward). `Downsample.forward` takes it for CUDA inputs, or wherever
`fused=True` (argument) or `FUSED = True` (module switch) asks for it, e.g. tests on the CPU under
TRITON_INTERPRET=1; `fused=False` / `FUSED = False` keep the torch code below, which stays the
reference. The fused path returns its summaries in x's dtype, as views of one buffer [B, H, T, d].
"""

import torch
from torch import nn

from .errors import ConfigurationError
from .functional import level_widths, padded_length, triton_installed

DOWNSAMPLE_KINDS = ("groupedconv", "conv", "avgpool")
FUSED_KINDS = ("groupedconv", "avgpool")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# None: fused for CUDA inputs when Triton is installed; True: fused wherever supported; False: never.
FUSED: bool | None = None


class Downsample(nn.Module):
    """Coarse summaries of every cell at every level for one of keys or values.

    forward(x [batch, heads, n, d], padding_mask [batch, n] bool or None), n a valid length ->
      summaries: per level l = 1..L, [batch, heads, (n / w_l) * p, d], cell-major;
      counts: None when nothing is padded (each summary stands for w_l / p tokens), else per level
        [batch, (n / w_l) * p], how many real tokens each summary stands for (0: masked).
    Padded positions are zero-filled first, so a partly padded cell is summarised from its real
    tokens only: the learned kinds apply their linear map to the real tokens, avgpool divides by
    the real count. Parameters exist for the levels of lengths up to `max_seq_len`.
    """

    def __init__(self, kind: str, *, head_dim: int, block_size: int, rank: int, max_seq_len: int):
        super().__init__()
        if kind not in DOWNSAMPLE_KINDS:
            raise ConfigurationError(
                f"Unknown downsampling {kind!r}; use model.attention.downsample= one of {', '.join(DOWNSAMPLE_KINDS)}."
            )
        self.kind, self.block_size, self.rank = kind, block_size, rank
        self.weight, self.bias = nn.ParameterDict(), nn.ParameterDict()
        learned_widths = [] if kind == "avgpool" else level_widths(padded_length(max_seq_len, block_size), block_size)
        for level, width in enumerate(learned_widths, 1):
            # Start every filter as the mean of its own 1/p of the cell: the coarse keys begin as the
            # avgpool summaries, for which scaled FMA is exact on inputs constant within cells, so
            # training starts from a sound approximation of full attention rather than from noise.
            # The p filters already differ, so no noise is needed to break symmetry between them.
            average = segment_average(width, rank)[:, :, None]  # [p, w, 1]
            if kind == "groupedconv":
                weight = average.expand(rank, width, head_dim)
            else:
                weight = average[..., None] * torch.eye(head_dim)
            self.weight[f"level{level}"] = nn.Parameter(weight.clone())
            self.bias[f"level{level}"] = nn.Parameter(torch.zeros(rank, head_dim))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, fused: bool | None = None):
        widths = level_widths(x.shape[2], self.block_size)
        if padding_mask is None:
            counts = None
        else:
            x = x.masked_fill(padding_mask[:, None, :, None], 0)
            real = (~padding_mask).to(torch.promote_types(x.dtype, torch.float32))
            counts = [self.real_counts(real, width) for width in widths]
        if self.use_fused(x, fused):
            from .triton_downsample import fused_summaries, split_levels  # imports Triton: only here

            weights = [self.weight[f"level{level}"] for level in range(1, len(widths) + 1)] if self.weight else None
            biases = [self.bias[f"level{level}"] for level in range(1, len(widths) + 1)] if self.bias else None
            buffer = fused_summaries(x, self.kind, self.block_size, self.rank, weights, biases, counts)
            return split_levels(buffer, self.block_size, self.rank), counts
        summaries = [
            self.summarise(x, level, width, None if counts is None else counts[level - 1])
            for level, width in enumerate(widths, 1)
        ]
        return summaries, counts

    def use_fused(self, x: torch.Tensor, fused: bool | None = None) -> bool:
        """Whether forward takes the fused Triton path (see the module docstring)."""
        wanted = FUSED if fused is None else fused
        if wanted is False or self.kind not in FUSED_KINDS or x.dtype not in FUSED_DTYPES:
            return False
        if not level_widths(x.shape[2], self.block_size):
            return False
        return True if wanted else x.is_cuda and triton_installed()

    def real_counts(self, real: torch.Tensor, width: int) -> torch.Tensor:
        """real [batch, n] (1 real, 0 pad) -> [batch, (n / w) * p]: real tokens behind each summary:
        those of its segment (avgpool), or those of its cell shared by its p summaries (learned)."""
        if self.kind == "avgpool":
            return real.unflatten(1, (-1, width // self.rank)).sum(2)
        return real.unflatten(1, (-1, width)).sum(2).repeat_interleave(self.rank, 1) / self.rank

    def summarise(self, x: torch.Tensor, level: int, width: int, counts: torch.Tensor | None) -> torch.Tensor:
        """x [batch, heads, n, d], zero at pads -> level summaries [batch, heads, (n / w) * p, d]."""
        if self.kind == "avgpool":
            segment = width // self.rank
            sums = x.unflatten(2, (-1, segment)).sum(3)
            return sums / (segment if counts is None else counts.clamp_min(1)[:, None, :, None].to(x.dtype))
        cells = x.unflatten(2, (-1, width))  # [batch, heads, cells, w, d]
        weight = self.weight[f"level{level}"]
        if self.kind == "groupedconv":
            # Broadcast multiply and sum: on the CPU, einsum("bhcwd,rwd->bhcrd") with a trainable
            # weight ran about 60 times slower (torch 2.13).
            summary = (cells.unsqueeze(3) * weight).sum(4)
        else:
            summary = torch.einsum("bhcwi,rwio->bhcro", cells, weight)
        return (summary + self.bias[f"level{level}"]).flatten(2, 3)


def segment_average(width: int, rank: int) -> torch.Tensor:
    """[rank, width]: row r averages the r-th of `rank` contiguous, near-equal segments of a cell."""
    segment_of_token = torch.arange(width) * rank // width
    one_hot = (segment_of_token == torch.arange(rank)[:, None]).float()
    return one_hot / one_hot.sum(1, keepdim=True)
