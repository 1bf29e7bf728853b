"""The learned basis: how a cell's tokens become its p coarse keys (or values) at each level.

Kinds (shared/docs/fma-algorithm.md), all shared across heads, one set of parameters per level:
- groupedconv: per channel, p filters of length w_l plus a bias; K~[cell, r, c] = b[r, c] +
  sum_t W[r, t, c] K[cell*w_l + t, c]. Parameters W [p, w_l, d], b [p, d] per level.
- conv: the same with channel mixing; K~[cell, r, o] = b[r, o] + sum_{t,c} W[r, t, c, o] K[.., c].
  Parameters W [p, w_l, d, d], b [p, d] per level.
- avgpool: the p summaries are means of w_l / p consecutive tokens; nothing is learned.
- multilevel (the Fast Multipole Method's upward pass): level 1 as groupedconv over m-token cells,
  W1 [p, m, d], b1 [p, d]; every coarser level's p summaries of a cell from the 2p summaries of its
  two children (child 0's p, then child 1's) by a child-to-parent map per channel,
  S_l[c, r] = b_l[r] + sum_{j<2p} A_l[r, j] S_{l-1}[2c + j // p, j % p], A_l [p, 2p, d], b_l [p, d],
  O(n d p) work. `multilevel_maps`: "shared" (default): one map A, b for all levels l >= 2, so the
  parameters do not depend on the length and it runs at any length (as avgpool does); "per_level":
  one map per level l = 2..L of max_seq_len's levels, parameters growing with the number of levels
  only, refused past max_seq_len (as groupedconv). Both are the same code: shared reads one map at
  every level. No level embedding.
A summary mixes only tokens of its own cell, which keeps the causal version leak-free.

Two paths, chosen by `backend` (the FMA layer passes its own): "torch" (`cellwise.py`, any device),
"triton" (`fused.py`: groupedconv and avgpool, all levels in one pass over x, forward and backward;
multilevel on the groupedconv kernel with its tree's effective filters, `multilevel.py`; CUDA, or the
CPU under TRITON_INTERPRET=1), "auto" (triton for CUDA inputs it supports, else torch). conv has no
kernel. The fused path returns its summaries in x's dtype, as views of one buffer [B, H, T, d].
"""

import math

import torch
from torch import nn

from ..errors import ConfigurationError
from ..indexing import level_widths, padded_length
from ..kernels import TRITON_INSTALLED, interpreted
from .cellwise import real_counts, summarise, upward
from .multilevel import fused_upward

DOWNSAMPLE_KINDS = ("groupedconv", "conv", "avgpool", "multilevel")
FUSED_KINDS = ("groupedconv", "avgpool", "multilevel")
ANY_LENGTH_KINDS = ("avgpool", "multilevel")  # parameters (if any) independent of the length: no max_seq_len
MULTILEVEL_MAPS = ("shared", "per_level")  # multilevel's child-to-parent maps: per_level is not of any length
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
    biases it is groupedconv with filters factored across levels (its fused path runs it as such, with
    the biases added separately: `multilevel.py`). groupedconv and conv have parameters
    for the levels of lengths up to `max_seq_len` (`level_parameters`), and so does multilevel with
    multilevel_maps="per_level" (`any_length` is False for these three); the other kinds ignore it.
    """

    def __init__(self, kind: str, *, head_dim: int, block_size: int, rank: int, max_seq_len: int,
                 multilevel_maps: str = "shared"):
        super().__init__()
        if kind not in DOWNSAMPLE_KINDS:
            raise ConfigurationError(
                f"Unknown downsampling {kind!r}; use model.attention.downsample= one of {', '.join(DOWNSAMPLE_KINDS)}."
            )
        if multilevel_maps not in MULTILEVEL_MAPS:
            raise ConfigurationError(
                f"Unknown multilevel_maps {multilevel_maps!r}; use model.attention.multilevel_maps= one of "
                f"{', '.join(MULTILEVEL_MAPS)}."
            )
        if multilevel_maps != "shared" and kind != "multilevel":
            raise ConfigurationError(
                f"model.attention.multilevel_maps={multilevel_maps} chooses downsample=multilevel's child-to-parent "
                f"maps, and downsample={kind} has none; set model.attention.multilevel_maps=shared or "
                f"model.attention.downsample=multilevel."
            )
        self.kind, self.block_size, self.rank, self.multilevel_maps = kind, block_size, rank, multilevel_maps
        levels = level_widths(padded_length(max_seq_len, block_size), block_size)
        # multilevel's filter banks have groupedconv's form: W1 over a cell's m tokens, then the maps A
        # (one shared, or one per level 2..L) over the 2p summaries of a parent's two children.
        maps = 1 if multilevel_maps == "shared" else len(levels) - 1
        learned_widths = ([] if kind == "avgpool" else [block_size] + [2 * rank] * maps if kind == "multilevel"
                          else levels)
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
        # weight [p m + 2 p^2, d], bias [2p, d] (b1, then b); per_level: W1, A_2, ..., A_L,
        # weight [p m + (L-1) 2 p^2, d], bias [L p, d] (b1, b_2, ..., b_L).
        self.weight = nn.Parameter(torch.cat([f.reshape(-1, head_dim) for f in filters])) if filters else None
        self.bias = nn.Parameter(torch.zeros(len(filters) * rank, head_dim)) if filters else None
        self.filter_shapes = [tuple(f.shape) for f in filters]

    @property
    def any_length(self) -> bool:
        """Whether its parameters (if any) are independent of the length: no max_seq_len to respect."""
        return self.kind in ANY_LENGTH_KINDS and self.multilevel_maps == "shared"

    @property
    def num_levels(self) -> int | None:
        """The levels it has parameters for (those of max_seq_len's valid length), None if any_length."""
        return None if self.any_length else len(self.filter_shapes)

    def level_parameters(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Level `level` (1-based)'s filters W_l [p, w_l, d] or [p, w_l, d, d] and bias [p, d]: views.
        multilevel: W1 [p, m, d] at level 1, the child-to-parent map A_l [p, 2p, d] above it (shared:
        the same A at every level)."""
        self.check_levels(level)
        bank = min(level, 2) if self.kind == "multilevel" and self.multilevel_maps == "shared" else level
        sizes = [math.prod(shape) // shape[-1] for shape in self.filter_shapes]
        start = sum(sizes[: bank - 1])
        weight = self.weight[start:start + sizes[bank - 1]].view(self.filter_shapes[bank - 1])
        return weight, self.bias[(bank - 1) * self.rank:bank * self.rank]

    def check_levels(self, count: int) -> None:
        """Refuse more levels than it has parameters for (those of its max_seq_len)."""
        if self.num_levels is not None and count > self.num_levels:
            raise ConfigurationError(
                f"downsample={self.kind} has parameters for {self.num_levels} levels (those of its "
                f"max_seq_len), not level {count}; lower data.seq_len= or raise model.attention.max_seq_len=."
            )

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, backend: str = "auto"):
        summaries, counts = summarise_sides((self,), [x], padding_mask, backend=backend)
        return summaries[0], counts

    def torch_summaries(self, x: torch.Tensor, widths: list[int], counts: list[torch.Tensor] | None):
        """The torch path: per level [batch, heads, (n / w_l) * p, d] of x [batch, heads, n, d] (zero at pads)."""
        parameters = self.parameters_of_levels(len(widths))
        if self.kind == "multilevel":
            return upward(x, self.block_size, self.rank, parameters, counts)
        return [summarise(self.kind, x, width, self.rank, weight, bias, count) for width, (weight, bias), count
                in zip(widths, parameters, counts or [None] * len(widths))]

    def parameters_of_levels(self, count: int) -> list[tuple]:
        """`level_parameters` of levels 1..count ((None, None) each for avgpool)."""
        if self.weight is None:
            return [(None, None)] * count
        return [self.level_parameters(level) for level in range(1, count + 1)]

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


def summarise_sides(downsamples, xs: list[torch.Tensor], padding_mask: torch.Tensor | None = None, *,
                    backend: str = "auto"):
    """Each side x in xs ([batch, heads, n, d] each, one shape) summarised by its own Downsample (a
    layer's keys and values: two sides, two modules built alike) -> (per side the per-level summaries
    of `Downsample.forward`, counts as there, the same for every side). On the fused path the two
    sides share every kernel launch (the kernels' second grid axis)."""
    first = downsamples[0]
    widths = level_widths(xs[0].shape[2], first.block_size)
    first.check_levels(len(widths))
    if padding_mask is None:
        counts = None
    else:
        xs = [x.masked_fill(padding_mask[:, None, :, None], 0) for x in xs]
        real = (~padding_mask).to(torch.promote_types(xs[0].dtype, torch.float32))
        counts = [real_counts(first.kind, real, width, first.rank) for width in widths]
    if first.resolved_backend(xs[0], backend) == "triton":
        from .fused import fused_summaries, split_levels  # imports Triton: only here

        m, p = first.block_size, first.rank
        if first.kind == "multilevel":
            buffer = fused_upward(xs, m, p, [side.parameters_of_levels(len(widths)) for side in downsamples], counts)
        else:  # the kernels read every level's filters from each side's one weight and bias
            learned = first.weight is not None
            buffer = fused_summaries(xs, first.kind, m, p, [side.weight for side in downsamples] if learned else None,
                                     [side.bias for side in downsamples] if learned else None, counts)
        return [split_levels(side, m, p) for side in buffer.unbind(0)], counts
    return [side.torch_summaries(x, widths, counts) for side, x in zip(downsamples, xs)], counts
