"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), feature map elu(x) + 1.

    out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps),   j <= i when causal.

Non-causal: phi(K)^T V ([d, d]) and sum_j phi(k_j) once, O(n d^2). Causal, chunked: within a chunk
the quadratic form with a causal mask; across chunks the running state sum phi(k_j) v_j^T of all
earlier chunks, one [d, d] state per chunk (never one per position). `naive.py` holds the plain
O(n^2) formula the tests hold both paths to.
Decoding keeps the two running sums, [d, d] and [d], and adds one position at a time
(`running_sums`, `linear_attention_step`).

Precision: inputs are upcast to float32 (float64 stays float64), so the feature map, the
elementwise work and the running sums across chunks are float32, and the output is cast back (in
bf16, elu(x) + 1 rounds to 0 for x below about -5.5, and long sums lose the small terms). Under
autocast the matrix products still run in bf16 with float32 accumulation, like the model's other
matmuls: each product is rounded once, never a running sum.
"""

import torch
import torch.nn.functional as F


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: positive, so every weight phi(q).phi(k) is positive and the normaliser never vanishes."""
    return F.elu(x) + 1


def linear_attention(q, k, v, *, causal: bool, chunk_size: int, eps: float, padding_mask=None):
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d] in q's dtype; padded keys get weight 0."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    phi_q, phi_k, v = feature_map(q.to(compute)), feature_map(k.to(compute)), v.to(compute)
    if padding_mask is not None:
        phi_k = phi_k.masked_fill(padding_mask[:, None, :, None], 0.0)
    if causal:
        numerator, denominator = causal_chunked_sums(phi_q, phi_k, v, chunk_size)
    else:
        numerator = phi_q @ (phi_k.transpose(-1, -2) @ v)
        denominator = phi_q @ phi_k.sum(-2).unsqueeze(-1)
    return (numerator / (denominator + eps)).to(dtype)


def causal_chunked_sums(phi_q, phi_k, v, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal numerator [b, h, n, d] and denominator [b, h, n, 1], chunk by chunk.

    The sequence is padded with phi(k) = 0 to whole chunks (pads add nothing). Chunk c's queries get
    the masked quadratic form within c plus their product with the state of chunks 0..c-1.
    """
    n = phi_q.shape[-2]
    phi_q, phi_k, v = in_chunks((phi_q, phi_k, v), chunk_size)
    causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
    within = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)  # [b, h, chunks, C, C]
    chunk_state = phi_k.transpose(-1, -2) @ v  # [b, h, chunks, d, d]: sum of phi(k_j) v_j^T in the chunk
    chunk_norm = phi_k.sum(-2).unsqueeze(-1)  # [b, h, chunks, d, 1]
    state, norm = exclusive_cumsum(chunk_state), exclusive_cumsum(chunk_norm)  # earlier chunks only
    numerator = within @ v + phi_q @ state
    denominator = within.sum(-1, keepdim=True) + phi_q @ norm
    return numerator.flatten(2, 3)[:, :, :n], denominator.flatten(2, 3)[:, :, :n]


def causal_denominator(phi_q, phi_k, chunk_size: int) -> torch.Tensor:
    """sum_{j <= i} phi(q_i).phi(k_j) [b, h, n, 1] from phi_q, phi_k [b, h, n, d]: prefix sums of phi(k)
    within each chunk, plus the chunks before it. One cumsum along n would be a sequential scan of
    length n per (b, h, d) column on CUDA; here the scans are chunk_size and n / chunk_size long."""
    n = phi_q.shape[-2]
    phi_q, phi_k = in_chunks((phi_q, phi_k), chunk_size)
    within = phi_k.cumsum(-2)  # [b, h, chunks, C, d]
    before = exclusive_cumsum(within[:, :, :, -1:])  # [b, h, chunks, 1, d]
    return (phi_q * (within + before)).sum(-1, keepdim=True).flatten(2, 3)[:, :, :n]


def in_chunks(tensors, chunk_size: int) -> list[torch.Tensor]:
    """Each [b, h, n, d] zero-padded to whole chunks and viewed as [b, h, chunks, chunk_size, d]."""
    n = tensors[0].shape[-2]
    chunks = -(-n // chunk_size)
    return [F.pad(x, (0, 0, 0, chunks * chunk_size - n)).unflatten(-2, (chunks, chunk_size)) for x in tensors]


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sums over the chunks before each chunk (dim 2), starting from zero; no subtraction, so no cancellation."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2).cumsum(2)


def running_sums(k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal decoding's state after keys and values [b, h, n, d]: sum_j phi(k_j) v_j^T [b, h, d, d] and
    sum_j phi(k_j) [b, h, d, 1], in the compute dtype."""
    phi_k = feature_map(k.to(torch.promote_types(k.dtype, torch.float32)))
    return phi_k.transpose(-1, -2) @ v.to(phi_k.dtype), phi_k.sum(-2).unsqueeze(-1)


def linear_attention_step(q, k, v, state, *, eps: float):
    """One causal position, q, k, v [b, h, 1, d], on the `running_sums` of the positions before it:
    (its output [b, h, 1, d] in q's dtype, the sums including it). O(d^2) whatever the length."""
    key_state, norm = (total + new for total, new in zip(state, running_sums(k, v)))
    phi_q = feature_map(q.to(key_state.dtype))
    return ((phi_q @ key_state) / (phi_q @ norm + eps)).to(q.dtype), (key_state, norm)
