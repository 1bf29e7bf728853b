"""multilevel on the fused path: its upward pass rewritten as one groupedconv, which the kernel runs.

Why it is exact: every level-l summary is affine in its own cell's tokens. Without padding,
    S_l[cell, r, c] = beta_l[r, c] + sum_{t < w_l} W_l^eff[r, t, c] x[cell * w_l + t, c],
with effective filters [p, w_l, d] and biases [p, d] that follow the tree (child k in {0, 1}, q < p):
    W_1^eff = W1,  W_l^eff[r, k w_{l-1} + t, c] = sum_q A_l[r, k p + q, c] W_{l-1}^eff[q, t, c],
    beta_1  = b1,  beta_l[r, c] = b_l[r, c] + sum_{k, q} A_l[r, k p + q, c] beta_{l-1}[q, c].
So the groupedconv kernel given these filters computes all of multilevel's levels in one pass over x,
forward and backward, and autograd carries dW^eff back to W1 and the maps through the small products
that build them (O(p^2 w_l d) per level, independent of batch and heads; W^eff is as large as
groupedconv's own filters). With padding, a child of no real token is dropped by its parent
(`cellwise.upward_from`); its tokens, hence its whole subtree's, are zero, so its linear part is zero
anyway and what is dropped is exactly its bias's propagation: the kernel runs with zero biases and
`padded_biases` adds per batch the bias part, `upward` of x = 0.
"""

import torch

from .cellwise import upward_from


def effective_filters(parameters) -> tuple[torch.Tensor, torch.Tensor]:
    """parameters: multilevel's `Downsample.parameters_of_levels` for L levels (W1 [p, m, d], b1 [p, d],
    then A_l [p, 2p, d], b_l [p, d]) -> W_cat [sum_l p w_l, d] (rows level-major, level l's W_l^eff
    [p, w_l, d]) and b_cat [L p, d] (level l's beta_l at rows (l-1) p .. l p), the layout that
    `fused.fused_summaries(x, "groupedconv", ...)` reads. Differentiable in the parameters."""
    (w1, b1), *maps = parameters
    p, d = b1.shape
    filters, biases = [w1], [b1]
    for a, b in maps:
        a = a.unflatten(1, (2, p))  # [r, child k, q, c]
        filters.append(torch.einsum("rkqc,qtc->rktc", a, filters[-1]).flatten(1, 2))
        biases.append(b + torch.einsum("rkqc,qc->rc", a, biases[-1]))
    return torch.cat([f.reshape(-1, d) for f in filters]), torch.cat(biases)


def padded_biases(parameters, counts: list[torch.Tensor], n: int, block_size: int) -> torch.Tensor:
    """The bias part of every summary when padded: [batch, 1, T, d], levels concatenated as in the fused
    buffer (T = sum_l (n / w_l) p). It is `upward` of x = 0: b1 at every level-1 cell (an empty cell's
    too), then each map over its children's, a child of no real token dropped. counts: `real_counts`
    per level [batch, (n / w_l) p]. Tiny (no heads, O(n p^2 d / m) work)."""
    (_, b1), *maps = parameters
    leaves = b1.repeat(n // block_size, 1)[None, None]  # [1, 1, (n / m) p, d]
    levels = upward_from(leaves, b1.shape[0], maps, counts)
    return torch.cat([level.expand(counts[0].shape[0], -1, -1, -1) for level in levels], 2)


def fused_upward(xs: list[torch.Tensor], block_size: int, rank: int, parameters, counts) -> torch.Tensor:
    """multilevel's summaries of each side x in xs (1 or 2 tensors [B, H, n, d], zero at pads) by the
    fused groupedconv kernel, the sides in the same launches: one buffer [S, B, H, T, d] in x's dtype,
    levels as `fused.split_levels` splits each side, equal to `upward` to rounding. parameters: per
    side, `Downsample.parameters_of_levels` for n's levels; counts: `real_counts` per level or None."""
    from .fused import fused_summaries  # imports Triton: only here

    # In float32 even under autocast or with bf16 parameters, as groupedconv's own filters are: the
    # kernel splits float32 filters into hi + lo halves, and the levels' products do not compound
    # bf16 rounding.
    parameters = [[(weight.float(), bias.float()) for weight, bias in side] for side in parameters]
    n = xs[0].shape[2]
    with torch.autocast(xs[0].device.type, enabled=False):
        filters, biases = zip(*[effective_filters(side) for side in parameters])
        bias_part = None if counts is None else torch.stack(
            [padded_biases(side, counts, n, block_size) for side in parameters])
    if counts is None:
        return fused_summaries(xs, "groupedconv", block_size, rank, list(filters), list(biases))
    linear = fused_summaries(xs, "groupedconv", block_size, rank, list(filters), [torch.zeros_like(b) for b in biases])
    return (linear + bias_part).to(xs[0].dtype)
