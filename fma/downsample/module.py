"""The learned basis: how a cell's tokens become its p coarse keys (or values) at each level.

Kinds (shared/docs/fma-algorithm.md), all shared across heads, one set of parameters per level:
- groupedconv: per channel, p filters of length w_l plus a bias; K~[cell, r, c] = b[r, c] +
  sum_t W[r, t, c] K[cell*w_l + t, c]. Parameters W [p, w_l, d], b [p, d] per level.
- conv: the same with channel mixing; K~[cell, r, o] = b[r, o] + sum_{t,c} W[r, t, c, o] K[.., c].
  Parameters W [p, w_l, d, d], b [p, d] per level.
- avgpool: the p summaries are means of w_l / p consecutive tokens; nothing is learned.
- multilevel (the Fast Multipole Method's upward pass): level 1 as groupedconv over m-token cells,
  W1 [p, m, d], b1 [p, d]; every coarser level's p summaries of a cell from the 2p summaries of its
  two children (child 0's p, then child 1's) by one child-to-parent map per channel shared by all
  levels, S_{l+1}[c, r] = b[r] + sum_{j<2p} A[r, j] S_l[2c + j // p, j % p], A [p, 2p, d], b [p, d].
  The parameters do not depend on the length, so it runs at any length (as avgpool does), with
  O(n d p) work. Shared rather than per-level maps keep that property; a level embedding is left out.
A summary mixes only tokens of its own cell, which keeps the causal version leak-free.

Two paths, chosen by `backend` (the FMA layer passes its own): "torch" (`cellwise.py`, any device),
"triton" (`fused.py`: groupedconv and avgpool, all levels in one pass over x, forward and backward;
CUDA, or the CPU under TRITON_INTERPRET=1), "auto" (triton for CUDA inputs it supports, else torch).
The fused path returns its summaries in x's dtype, as views of one buffer [B, H, T, d].
"""

import math

import torch
from torch import nn

from ..errors import ConfigurationError
from ..indexing import level_widths, padded_length
from ..kernels import TRITON_INSTALLED, interpreted
from .cellwise import real_counts, summarise, upward

DOWNSAMPLE_KINDS = ("groupedconv", "conv", "avgpool", "multilevel")
FUSED_KINDS = ("groupedconv", "avgpool")
ANY_LENGTH_KINDS = ("avgpool", "multilevel")  # parameters (if any) independent of the length: no max_seq_len
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Downsample(nn.Module):
    """Coarse summaries of every cell at every level for one of keys or values.

    forward(x [batch, heads, n, d], padding_mask [batch, n] bool or None, backend), n a valid length ->
      summaries: per level l = 1..L, [batch, heads, (n / w_l) * p, d], cell-major;
      counts: None when nothing is padded (each summary stands for w_l / p tokens), else per level
        [batch, (n / w_l) * p], how many real tokens each summary stands for (0: masked).
    Padded positions are zero-filled first, so a partly padded cell is summarised from its real
    tokens only: the learned kinds apply their linear map to the real tokens, avgpool divides by
    the real count; multilevel also drops a child cell of no real token from its parent's map (its
    summaries are zeroed: its bias would otherwise stand in for tokens that do not exist), so without
    biases it is groupedconv with filters factored across levels. groupedconv and conv have parameters
    for the levels of lengths up to `max_seq_len` (`level_parameters`); the other kinds ignore it.
    """

    def __init__(self, kind: str, *, head_dim: int, block_size: int, rank: int, max_seq_len: int):
        super().__init__()
        if kind not in DOWNSAMPLE_KINDS:
            raise ConfigurationError(
                f"Unknown downsampling {kind!r}; use model.attention.downsample= one of {', '.join(DOWNSAMPLE_KINDS)}."
            )
        self.kind, self.block_size, self.rank = kind, block_size, rank
        # multilevel's two filter banks have groupedconv's form: W1 over a cell's m tokens, A over the
        # 2p summaries of a parent's two children.
        learned_widths = ([] if kind == "avgpool" else [block_size, 2 * rank] if kind == "multilevel"
                          else level_widths(padded_length(max_seq_len, block_size), block_size))
        # Start every filter as the mean of its own 1/p of the cell: the coarse keys begin as the
        # avgpool summaries, for which scaled FMA is exact on inputs constant within cells, so
        # training starts from a sound approximation of full attention rather than from noise.
        # The p filters already differ, so no noise is needed to break symmetry between them.
        # (multilevel's A then averages children's summaries 2r and 2r+1: the parent's segment r.)
        averages = [segment_average(width, rank)[:, :, None] for width in learned_widths]  # [p, w, 1] each
        if kind != "conv":
            filters = [average.expand(rank, width, head_dim) for average, width in zip(averages, learned_widths)]
        else:
            filters = [average[..., None] * torch.eye(head_dim) for average in averages]
        # One tensor for all levels (fewer parameters for the optimizer, the clipping and autograd to
        # walk each step, and the fused kernels read it as it is): weight [sum_l p w_l (d), d], rows
        # level-major, level l's filters W_l [p, w_l, d] (groupedconv) or [p, w_l, d, d] (conv) in
        # order; bias [L p, d], level l's [p, d] at rows (l-1) p .. l p. multilevel: W1 then A,
        # weight [p m + 2 p^2, d], bias [2p, d] (b1, then b).
        self.weight = nn.Parameter(torch.cat([f.reshape(-1, head_dim) for f in filters])) if filters else None
        self.bias = nn.Parameter(torch.zeros(len(filters) * rank, head_dim)) if filters else None
        self.filter_shapes = [tuple(f.shape) for f in filters]

    def level_parameters(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Level `level` (1-based)'s filters W_l [p, w_l, d] or [p, w_l, d, d] and bias [p, d]: views.
        multilevel: W1 [p, m, d] at level 1, the shared child-to-parent map A [p, 2p, d] above it."""
        bank = min(level, 2) if self.kind == "multilevel" else level
        sizes = [math.prod(shape) // shape[-1] for shape in self.filter_shapes]
        start = sum(sizes[: bank - 1])
        weight = self.weight[start:start + sizes[bank - 1]].view(self.filter_shapes[bank - 1])
        return weight, self.bias[(bank - 1) * self.rank:bank * self.rank]

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, backend: str = "auto"):
        widths = level_widths(x.shape[2], self.block_size)
        if padding_mask is None:
            counts = None
        else:
            x = x.masked_fill(padding_mask[:, None, :, None], 0)
            real = (~padding_mask).to(torch.promote_types(x.dtype, torch.float32))
            counts = [real_counts(self.kind, real, width, self.rank) for width in widths]
        if self.resolved_backend(x, backend) == "triton":
            from .fused import fused_summaries, split_levels  # imports Triton: only here

            buffer = fused_summaries(x, self.kind, self.block_size, self.rank, self.weight, self.bias, counts)
            return split_levels(buffer, self.block_size, self.rank), counts
        if self.kind == "multilevel":
            return upward(x, len(widths), self.block_size, self.rank, self.level_parameters(1),
                          self.level_parameters(2), counts), counts
        parameters = ([self.level_parameters(level) for level in range(1, len(widths) + 1)] if self.weight is not None
                      else [(None, None)] * len(widths))
        summaries = [summarise(self.kind, x, width, self.rank, weight, bias, count) for width, (weight, bias), count
                     in zip(widths, parameters, counts or [None] * len(widths))]
        return summaries, counts

    def resolved_backend(self, x: torch.Tensor, backend: str) -> str:
        """The path that summarises x: "auto" takes triton for CUDA inputs it supports. An explicit
        "triton" that cannot run x (no kernel for the kind or dtype) is an error, not a silent fall-back."""
        fusable = self.kind in FUSED_KINDS and x.dtype in FUSED_DTYPES
        if backend == "auto":
            return "triton" if fusable and x.is_cuda and TRITON_INSTALLED else "torch"
        if backend == "triton" and not fusable:
            raise ConfigurationError(
                f"The triton backend has no kernel for downsample={self.kind} in {x.dtype} (fused: "
                f"{', '.join(FUSED_KINDS)} in {', '.join(str(t) for t in FUSED_DTYPES)}); set "
                f"model.attention.backend=auto or torch, or model.attention.downsample= one of {', '.join(FUSED_KINDS)}."
            )
        if backend == "triton" and not (TRITON_INSTALLED and (x.is_cuda or interpreted())):
            raise ConfigurationError(
                f"model.attention.backend=triton runs FMA's fused kernels, which need triton and a CUDA GPU (this "
                f"input is on {x.device}{'' if TRITON_INSTALLED else ', and triton is not installed'}); set "
                f"model.attention.backend=auto (the kernels where they can run) or torch."
            )
        return backend


def segment_average(width: int, rank: int) -> torch.Tensor:
    """[rank, width]: row r averages the r-th of `rank` contiguous, near-equal segments of a cell."""
    segment_of_token = torch.arange(width) * rank // width
    one_hot = (segment_of_token == torch.arange(rank)[:, None]).float()
    return one_hot / one_hot.sum(1, keepdim=True)
