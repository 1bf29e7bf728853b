"""Plain summaries of one cell: the ground truth for both paths of the learned basis (any dtype).

Written from shared/docs/fma-algorithm.md ("Coarse keys and values"), one summary at a time; used by
`fma.multipole.naive` and the tests, never for training.
"""

import torch


def summarise_cell(x, real, downsample, level: int):
    """x [batch, heads, w, d]: one level-`level` cell; real [batch, w] bool (False = pad)
    -> summaries [batch, heads, p, d] of its real tokens, counts [batch, p] of real tokens behind each.
    multilevel: recursive over the cell's two halves, down to its m-token cells."""
    p, dtype = downsample.rank, x.dtype
    x = x.masked_fill(~real[:, None, :, None], 0)
    if downsample.kind == "avgpool":
        segment = x.shape[2] // p
        sums, counts = [], []
        for r in range(p):
            part = slice(r * segment, (r + 1) * segment)
            sums.append(x[:, :, part].sum(2))
            counts.append(real[:, part].sum(1).to(dtype))
        counts = torch.stack(counts, 1)
        return torch.stack(sums, 2) / counts.clamp_min(1)[:, None, :, None], counts
    weight, bias = downsample.level_parameters(level)
    if downsample.kind == "multilevel" and level > 1:
        # The parent's map reads its two halves' 2p summaries as groupedconv reads tokens; a half
        # of no real token is dropped (zeroed).
        half = x.shape[2] // 2
        x = torch.cat([summarise_cell(x[:, :, part], real[:, part], downsample, level - 1)[0]
                       .masked_fill(~real[:, part].any(1)[:, None, None, None], 0)
                       for part in (slice(None, half), slice(half, None))], 2)
    if downsample.kind == "conv":
        summary = bias + torch.einsum("bhtc,rtco->bhro", x, weight)
    else:
        summary = bias + torch.einsum("bhtd,rtd->bhrd", x, weight)
    counts = (real.sum(1, keepdim=True).to(dtype) / p).expand(-1, p)
    return summary, counts
