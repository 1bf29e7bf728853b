"""Reformer's LSH attention with plain loops over explicit key sets: the ground truth of
`blockwise.py` (tests only)."""

import torch


def lsh_attention_reference(q, k, v, buckets, *, window: int, causal: bool) -> torch.Tensor:
    """The same attention with plain loops: per query the union of its key sets over rounds, itself
    only when that union holds nothing else, and one softmax (no padding)."""
    batch, heads, rounds, n = buckets.shape
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                seen = set()
                for r in range(rounds):
                    same = [j for j in range(n) if buckets[b, h, r, j] == buckets[b, h, r, i]]  # in sorted order
                    place = same.index(i)
                    seen.update(same[max(0, place - window + 1) : place + 1 if causal else place + window])
                keys = sorted(seen - {i}) or [i]
                weights = torch.softmax(k[b, h, keys] @ q[b, h, i] * q.shape[-1] ** -0.5, 0)
                rows.append(weights @ v[b, h, keys])
    return torch.stack(rows).view(q.shape)
