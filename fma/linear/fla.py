"""Causal linear attention on flash-linear-attention's chunked Triton kernels (`fla-core`, the
optional `gpu` extra): backend "fla" of `model=linear`; `chunk.py` stays the reference and the CPU path.

fla computes o_i = scale * sum_{j <= i} (q_i . k_j) v_j chunk by chunk (`chunk_simple_gla` without
gates, which is what its `chunk_linear_attn` runs). Here:
- the feature map elu + 1 is applied beforehand, in float32 (in bf16, elu(x) + 1 cancels to 0 below
  x of about -5.5; computed in float32 and then rounded, phi keeps bf16's relative precision);
- scale = 1 (this linear attention has no 1/sqrt(d));
- the denominator phi(q_i) . sum_{j <= i} phi(k_j) is computed here in float32 (prefix sums by
  chunks, `chunk.causal_denominator`) with the layer's eps, not with fla's `normalize=True`, which
  divides by the same sum held in the inputs' dtype plus a fixed 1e-10;
- the numerator runs on fla's kernels in the inputs' dtype (bf16: tensor cores; fla keeps each
  chunk's running state in that dtype in the forward, float32 in the backward; float32 inputs get
  TF32 dots on Ampere and newer unless TRITON_F32_DEFAULT=ieee).
Non-causal linear attention is two matmuls (`chunk.py`), which fla would not speed up.

The kernels are wrapped as registered operators (torch.library), so a compiled model traces through
them without a graph break (fla's own entry points are torch.compiler.disable'd). They call fla's
forward and backward functions of `fla.ops.simple_gla.chunk` (internal API: the extra pins fla-core
to the versions tested). fla is imported only when the operators run.
"""

import functools
import importlib.util

import torch

from .chunk import causal_denominator, feature_map

FLA_CHUNK = 64  # fla's chunk length (its default; independent of the layer's chunk_size)


@functools.cache
def fla_available() -> bool:
    """Whether fla-core imports here (it needs triton; its kernels need a GPU)."""
    if importlib.util.find_spec("fla") is None:
        return False
    try:
        importlib.import_module("fla.ops.simple_gla.chunk")
    except Exception:  # noqa: BLE001 - a broken or incompatible install means: not available
        return False
    return True


@torch.library.custom_op("fma::fla_causal_numerator", mutates_args=())
def causal_numerator(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, n, h, d] each (one dtype, contiguous) -> sum_{j <= i} (phi_q_i . phi_k_j) v_j [b, n, h, d]."""
    from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd

    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    with torch.cuda.device(phi_q.device):
        out, _ = chunk_simple_gla_fwd(q=phi_q, k=phi_k, v=v, g=None, g_gamma=None, scale=1.0, initial_state=None,
                                      output_final_state=False, cu_seqlens=None, chunk_size=FLA_CHUNK)
    return out.to(v.dtype)


@causal_numerator.register_fake
def _(phi_q, phi_k, v):
    return torch.empty_like(v)


@torch.library.custom_op("fma::fla_causal_numerator_backward", mutates_args=())
def causal_numerator_backward(grad: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
                              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fla.ops.simple_gla.chunk import chunk_simple_gla_bwd

    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    with torch.cuda.device(phi_q.device):
        dq, dk, dv, _, _ = chunk_simple_gla_bwd(q=phi_q, k=phi_k, v=v, g=None, g_gamma=None, initial_state=None,
                                                do=grad.to(v.dtype).contiguous(), dht=None, scale=1.0,
                                                cu_seqlens=None, chunk_size=FLA_CHUNK)
    return dq.to(phi_q.dtype), dk.to(phi_k.dtype), dv.to(v.dtype)


@causal_numerator_backward.register_fake
def _(grad, phi_q, phi_k, v):
    return torch.empty_like(phi_q), torch.empty_like(phi_k), torch.empty_like(v)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return causal_numerator_backward(grad, *ctx.saved_tensors)


causal_numerator.register_autograd(_backward, setup_context=_save_for_backward)


def fla_causal_linear_attention(q, k, v, *, eps: float, padding_mask=None, numerator=None) -> torch.Tensor:
    """q, k, v [batch, heads, n, d] -> [batch, heads, n, d] in q's dtype: `chunk.linear_attention`
    with causal=True, its numerator on fla's kernels in q's dtype. `numerator`: the [b, n, h, d]
    function computing it (default: fla's, `causal_numerator`; the CPU tests pass a torch one)."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    phi_q, phi_k = feature_map(q.to(compute)), feature_map(k.to(compute))
    if padding_mask is not None:
        phi_k = phi_k.masked_fill(padding_mask[:, None, :, None], 0.0)
    denominator = causal_denominator(phi_q, phi_k, FLA_CHUNK)  # [b, h, n, 1], float32
    # fla's layout is [b, n, h, d]; the layer's q, k, v are usually views of [b, n, h, d] already.
    phi_q, phi_k, v = (x.to(dtype).transpose(1, 2).contiguous() for x in (phi_q, phi_k, v))
    out = (numerator or causal_numerator)(phi_q, phi_k, v).transpose(1, 2)
    return (out.to(compute) / (denominator + eps)).to(dtype)
