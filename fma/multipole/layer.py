"""Fast Multipole Attention as an attention kind: `model=fma`."""

import torch
import torch.nn.functional as F

from ..downsample import FUSED_KINDS, Downsample, summarise_sides
from ..errors import ConfigurationError
from ..indexing import padded_length
from ..layer import AttentionLayer, check_length
from ..registry import register_attention
from .attention import BACKENDS, multipole_attention, triton_supports
from .coarse_queries import coarse_query_attention
from .decode import attend_step, prompt_state


@register_attention("fma")
class FastMultipoleAttention(AttentionLayer):
    """Fine attention to neighbour blocks, learned coarse summaries farther away, one softmax.

    Options: block_size m (finest block), rank p (summaries per cell and level), downsample (how
    cells are summarised, separately for keys and values, see fma/downsample/), multilevel_maps
    (multilevel's child-to-parent maps: "shared" by all levels, or "per_level"), scale_coarse
    (a summary counts as the tokens it stands for: + log(w/p) on its logit), max_seq_len (the
    longest input for groupedconv, conv and multilevel with per_level maps, which have parameters
    per level, and the number of levels grows with length; avgpool and multilevel with shared maps
    run at any length), and backend, which
    governs both the attention and the downsampling: "torch" (the portable paths), "triton" (the
    fused kernels), "auto" (each part on its kernel where that supports the input, e.g. CUDA, its
    torch path otherwise). downsample_queries: the O(n) variant (fma/multipole/coarse_queries.py):
    at every coarse level a query is represented by the mean query of its segment of w/p tokens.
    Bidirectional only (a segment's mean holds later tokens' queries: causal=True is refused), the
    attention on its torch path only (backend=triton is refused, auto takes torch; the downsampling
    of keys and values still uses its kernels under auto), and p must divide m.

    Any length works: a sequence is padded at the end to `padded_length` (m * 2^k, at least 4m).
    Padded positions, and positions marked in `padding_mask`, get exactly zero attention weight:
    as fine keys they are masked, and coarse summaries are built from real tokens only and
    weighted by real counts; a summary of no real token is masked. Short sequences need no special
    case: for n <= 2m every real key lies in a query's fine neighbourhood and every coarse cell is
    padding, so the result is exact full attention; for 2m < n < 4m it is FMA at length 4m.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        causal: bool,
        block_size: int = 64,
        rank: int = 2,
        downsample: str = "groupedconv",
        scale_coarse: bool = True,
        backend: str = "auto",
        max_seq_len: int = 4096,
        downsample_queries: bool = False,
        multilevel_maps: str = "shared",
    ):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if block_size < 1:
            raise ConfigurationError(f"block_size={block_size} must be at least 1; set model.attention.block_size=.")
        if not 1 <= rank <= block_size:
            raise ConfigurationError(
                f"rank={rank} must be between 1 and block_size={block_size} (more summaries than tokens "
                f"summarise nothing); set model.attention.rank=."
            )
        if downsample == "avgpool" and block_size % rank:
            raise ConfigurationError(
                f"avgpool averages block_size/rank tokens per summary, so rank={rank} must divide "
                f"block_size={block_size}; set model.attention.rank= or model.attention.block_size=."
            )
        if max_seq_len < 1:
            raise ConfigurationError(
                f"max_seq_len={max_seq_len} must be at least 1; set model.attention.max_seq_len=."
            )
        if backend != "auto" and backend not in BACKENDS:
            raise ConfigurationError(
                f"Unknown FMA backend {backend!r}; use model.attention.backend= one of auto, {', '.join(BACKENDS)}."
            )
        if backend == "triton" and downsample not in FUSED_KINDS:
            raise ConfigurationError(
                f"backend=triton runs every part of FMA on its kernels, and downsample={downsample} has none "
                f"(fused: {', '.join(FUSED_KINDS)}); set model.attention.backend=auto (kernels where they "
                f"exist) or torch, or model.attention.downsample= one of {', '.join(FUSED_KINDS)}."
            )
        if downsample_queries and causal:
            raise ConfigurationError(
                "model.attention.downsample_queries=true summarises each cell's queries, so a coarse query mixes "
                "the queries of later tokens of its cell and a causal model would see the future; it has no causal "
                "form. Train it as a masked LM with objective=mlm, or set model.attention.downsample_queries=false."
            )
        if downsample_queries and backend == "triton":
            raise ConfigurationError(
                "model.attention.downsample_queries=true runs on the torch path only (the fused kernels do not "
                "summarise queries); set model.attention.backend=auto or torch, or "
                "model.attention.downsample_queries=false."
            )
        if downsample_queries and block_size % rank:
            raise ConfigurationError(
                f"downsample_queries=true averages queries over segments of block_size/rank tokens that must nest "
                f"across levels, so rank={rank} must divide block_size={block_size}; set model.attention.rank= or "
                f"model.attention.block_size=."
            )
        self.block_size, self.scale_coarse, self.max_seq_len = block_size, scale_coarse, max_seq_len
        self.downsample_queries = downsample_queries
        self.backend = backend
        basis = dict(head_dim=self.head_dim, block_size=block_size, rank=rank, max_seq_len=max_seq_len,
                     multilevel_maps=multilevel_maps)
        self.key_downsample = Downsample(downsample, **basis)
        self.value_downsample = Downsample(downsample, **basis)

    def attend(self, q, k, v, padding_mask):
        """q, k, v [batch, heads, n, d], padding_mask [batch, n] (True = pad) or None -> [batch, heads, n, d]."""
        self.check_length(q.shape[2])
        return summarised_attention(q, k, v, padding_mask, key_downsample=self.key_downsample,
                                    value_downsample=self.value_downsample, block_size=self.block_size,
                                    causal=self.causal, scale_coarse=self.scale_coarse, backend=self.backend,
                                    downsample_queries=self.downsample_queries)

    def check_length(self, n: int) -> None:
        """Refuse n positions where the summaries have parameters only up to max_seq_len (groupedconv, conv,
        multilevel with per_level maps: `Downsample.any_length`)."""
        if not self.key_downsample.any_length:
            check_length(n, self.max_seq_len, "FMA", "learned summaries exist only for the levels up to it")

    def decode_state(self, q, k, v):
        """FMA's own state (fma/multipole/decode.py), O((m + p log n) d); conv keeps the shell's O(n) one."""
        if self.key_downsample.kind == "conv":
            return super().decode_state(q, k, v)
        return prompt_state(self, k, v)

    def decode_step(self, q, k, v, state):
        if self.key_downsample.kind == "conv":
            return super().decode_step(q, k, v, state)
        self.check_length(state.length + 1)
        return attend_step(self, q, k, v, state)


def resolved_backend(backend: str, q: torch.Tensor, block_size: int) -> str:
    """The attention's backend for q: "auto" takes triton wherever the kernels support q."""
    return ("triton" if triton_supports(q, block_size) else "torch") if backend == "auto" else backend


def summarised_attention(q, k, v, padding_mask, *, key_downsample: Downsample, value_downsample: Downsample,
                         block_size: int, causal: bool, scale_coarse: bool, backend: str,
                         downsample_queries: bool = False) -> torch.Tensor:
    """FMA at any length: q, k, v [batch, heads, n, d] padded to a valid length (pads masked), keys and
    values summarised by their Downsample modules (on the fused path both in the same kernel launches),
    one multipole softmax, cropped back to n.
    downsample_queries: the O(n) variant's torch path (bidirectional; the caller refuses causal)."""
    batch, _, n, _ = q.shape
    valid = padded_length(n, block_size)
    if valid != n or padding_mask is not None:
        if padding_mask is None:
            padding_mask = torch.zeros(batch, n, dtype=torch.bool, device=q.device)
        padding_mask = F.pad(padding_mask, (0, valid - n), value=True)
        q, k, v = (F.pad(x, (0, 0, 0, valid - n)) for x in (q, k, v))
    (coarse_k, coarse_v), coarse_counts = summarise_sides((key_downsample, value_downsample), [k, v], padding_mask,
                                                          backend=backend)  # keys and values in one launch
    if downsample_queries:
        out = coarse_query_attention(q, k, v, coarse_k, coarse_v, block_size=block_size, rank=key_downsample.rank,
                                     scale_coarse=scale_coarse, key_padding_mask=padding_mask,
                                     coarse_counts=coarse_counts)
        return out[:, :, :n]
    out = multipole_attention(
        q, k, v, coarse_k, coarse_v, block_size=block_size, causal=causal, scale_coarse=scale_coarse,
        key_padding_mask=padding_mask, coarse_counts=coarse_counts, backend=resolved_backend(backend, q, block_size),
    )
    return out[:, :, :n]
