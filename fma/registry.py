"""One registry of attention kinds, so that `model=<kind>` is a name, not an import path."""

from .errors import ConfigurationError
from .layer import AttentionLayer

ATTENTION_KINDS: dict[str, type[AttentionLayer]] = {}


def register_attention(name: str):
    """Class decorator: make an `AttentionLayer` subclass buildable as `build_attention(name, ...)`."""

    def add(cls: type[AttentionLayer]) -> type[AttentionLayer]:
        if name in ATTENTION_KINDS:
            raise ValueError(f"attention kind {name!r} is registered twice")
        ATTENTION_KINDS[name] = cls
        return cls

    return add


def build_attention(name: str, *, dim: int, num_heads: int, causal: bool, **options) -> AttentionLayer:
    """An attention module of kind `name`: forward(x [b, n, dim], padding_mask=None) -> [b, n, dim]."""
    if name not in ATTENTION_KINDS:
        raise ConfigurationError(
            f"Unknown attention kind {name!r}. Known kinds: {', '.join(sorted(ATTENTION_KINDS))}. "
            f"Pick one with model=<kind> (one file per kind in configs/model/)."
        )
    return ATTENTION_KINDS[name](dim=dim, num_heads=num_heads, causal=causal, **options)
