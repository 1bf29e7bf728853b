"""Fast Multipole Attention and the attention kinds it is compared with, behind one registry."""

from . import full  # noqa: F401  (registers "full")
from . import htransformer  # noqa: F401  (registers "htransformer")
from . import linear  # noqa: F401  (registers "linear")
from . import local  # noqa: F401  (registers "local")
from . import reformer  # noqa: F401  (registers "reformer")
from .errors import ConfigurationError
from .layer import AttentionLayer
from .multipole import FastMultipoleAttention  # (registers "fma")
from .registry import ATTENTION_KINDS, build_attention, register_attention

__all__ = ["ATTENTION_KINDS", "AttentionLayer", "ConfigurationError", "FastMultipoleAttention", "build_attention", "register_attention"]
