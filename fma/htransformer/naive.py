"""H-Transformer-1D as a plain loop over batch, head and query with explicit coverage lists, built
from the span definition in `blockwise.py`'s docstring: the ground truth of that path (tests only)."""

import math

import torch

from .blockwise import num_levels


def coverage(i: int, n: int, block_size: int, causal: bool) -> list[tuple[int, int]]:
    """Query i's key set, built from the span definition: [(level, first token)] where a level-0
    entry is one token and a level-l entry the coarse token [first, first + 2^l) (its tokens past
    n - 1 are padding)."""
    def span(level):
        width = block_size << level
        block = i // width
        return set(range(max(0, (block - 1) * width), min(n, (block + 2) * width, i + 1 if causal else n)))

    entries = [(0, j) for j in sorted(span(0))]
    for level in range(1, num_levels(n, block_size) + 1):
        firsts = {j >> level << level for j in span(level) - span(level - 1)}
        entries += [(level, first) for first in sorted(firsts)]
    return entries


def hierarchical_attention_reference(q, k, v, *, block_size: int, causal: bool, padding_mask=None) -> torch.Tensor:
    """The same attention as a loop over batch, head and query with explicit `coverage` lists."""
    batch, heads, n, head_dim = q.shape
    real = torch.ones(batch, n, dtype=torch.bool) if padding_mask is None else ~padding_mask
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                logits, values = [], []
                for level, first in coverage(i, n, block_size, causal):
                    # A coarse token averages its real tokens; a padded fine key is seen by itself only.
                    tokens = [j for j in range(first, min(n, first + (1 << level))) if real[b, j] or j == i]
                    if not tokens:
                        continue
                    if level == 0 or causal:
                        query = q[b, h, i]
                    else:
                        first_own = (i >> level) << level
                        own = [j for j in range(first_own, min(n, first_own + (1 << level))) if real[b, j]]
                        query = q[b, h, own].sum(0) / max(len(own), 1)
                    logits.append(query @ k[b, h, tokens].mean(0) * head_dim**-0.5 + math.log(len(tokens)))
                    values.append(v[b, h, tokens].mean(0))
                rows.append(torch.softmax(torch.stack(logits), 0) @ torch.stack(values))
    return torch.stack(rows).view(batch, heads, n, head_dim)
