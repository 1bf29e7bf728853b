"""Fast Multipole Attention and the attention kinds it is compared with, behind one registry."""

from . import full  # noqa: F401  (registers "full")
from .errors import ConfigurationError
from .layer import AttentionLayer
from .registry import ATTENTION_KINDS, build_attention, register_attention

__all__ = ["ATTENTION_KINDS", "AttentionLayer", "ConfigurationError", "build_attention", "register_attention"]
