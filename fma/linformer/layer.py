"""Linformer (Wang et al. 2020) as an attention kind: `model=linformer objective=mlm` (`projected.py`)."""

import math

import torch
from torch import nn

from ..errors import ConfigurationError
from ..layer import AttentionLayer, check_length
from ..registry import register_attention
from .projected import linformer_attention

# The paper's sharing of E and F within a layer (its Section 4): headwise (E and F per layer, shared
# by the heads) and key-value (also E = F). Its layerwise sharing (one matrix for all layers) needs a
# parameter owned above the layers and is not offered.
SHARING = ("headwise", "key-value")


@register_attention("linformer")
class LinformerAttention(AttentionLayer):
    """Softmax attention to k learned projections of the keys and values along the sequence.

    k: projected length (rows of E and F; k >= n compresses nothing). max_seq_len: the longest input (columns of E and F); a
    shorter one uses the first n columns. sharing: "headwise" (separate E and F, the official code's
    default) or "key-value" (E = F). E and F start as the official code's: xavier uniform with gain
    1/sqrt(2). Bidirectional only.
    """

    has_causal_form = False
    why_no_causal_form = ("Linformer has no causal form: its projections E K and F V sum over every position, "
                          "future ones included, so each query would see tokens after it.")

    def __init__(self, *, dim: int, num_heads: int, causal: bool, k: int = 256, max_seq_len: int = 4096,
                 sharing: str = "headwise"):
        super().__init__(dim=dim, num_heads=num_heads, causal=causal)
        if max_seq_len < 1:
            raise ConfigurationError(f"max_seq_len={max_seq_len} must be at least 1; set model.attention.max_seq_len=.")
        if k < 1:
            raise ConfigurationError(f"k={k} must be at least 1 (projected keys); set model.attention.k=, e.g. "
                                     f"model.attention.k={max(1, max_seq_len // 4)}.")
        if sharing not in SHARING:
            raise ConfigurationError(
                f"Unknown Linformer sharing {sharing!r}; use model.attention.sharing= one of {', '.join(SHARING)}."
            )
        self.max_seq_len = max_seq_len
        self.key_projection = nn.Parameter(initial_projection(k, max_seq_len))
        if sharing == "headwise":
            self.value_projection = nn.Parameter(initial_projection(k, max_seq_len))
        else:
            self.register_parameter("value_projection", None)

    def attend(self, q, k, v, padding_mask):
        """q, k, v [batch, heads, n, d], padding_mask [batch, n] (True = pad) or None -> [batch, heads, n, d]."""
        check_length(q.shape[2], self.max_seq_len, "Linformer", "E and F have one column per position up to it")
        value_projection = self.key_projection if self.value_projection is None else self.value_projection
        return linformer_attention(q, k, v, self.key_projection, value_projection, padding_mask=padding_mask)


def initial_projection(k: int, max_seq_len: int) -> torch.Tensor:
    """[k, max_seq_len], xavier uniform with gain 1/sqrt(2) (fairseq's MultiheadLinearAttention)."""
    return nn.init.xavier_uniform_(torch.empty(k, max_seq_len), gain=1 / math.sqrt(2))
