"""Fast Multipole Attention and the attention kinds it is compared with, behind one registry.

One folder per operation, each with its plain reference (`naive.py`), its fast paths and its layer:
multipole/ (FMA), downsample/ (FMA's learned basis), full/, local/, linear/, htransformer/,
reformer/, fastmax/, linformer/, nystromformer/. Below them, importing nothing else from the
package: indexing.py (valid lengths, levels, interaction lists, layouts, logit biases), softmax.py
(split-softmax pieces), kernels.py (what the Triton kernels share), errors.py, layer.py (the shell
every kind shares), registry.py.
"""

from .errors import ConfigurationError
from .fastmax import FastmaxAttention  # noqa: F401  (registers "fastmax")
from .full import FullAttention  # noqa: F401  (registers "full")
from .htransformer import HTransformer1D  # noqa: F401  (registers "htransformer")
from .layer import AttentionLayer
from .linear import LinearAttention  # noqa: F401  (registers "linear")
from .linformer import LinformerAttention  # noqa: F401  (registers "linformer")
from .local import LocalAttention  # noqa: F401  (registers "local")
from .multipole import FastMultipoleAttention, multipole_attention  # (registers "fma")
from .nystromformer import NystromAttention  # noqa: F401  (registers "nystromformer")
from .reformer import ReformerAttention  # noqa: F401  (registers "reformer")
from .registry import ATTENTION_KINDS, build_attention, register_attention

__all__ = ["ATTENTION_KINDS", "AttentionLayer", "ConfigurationError", "FastMultipoleAttention", "build_attention",
           "multipole_attention", "register_attention"]
