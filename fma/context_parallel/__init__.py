"""Context parallelism for FMA: one sequence split in contiguous chunks over the ranks of a process group.

`context_parallel_multipole_attention` (multipole.py) is the attention of a `FastMultipoleAttention`
layer for this rank's chunk, exchanging with the other ranks only the fine neighbour blocks and the
coarse summaries its queries see (exchange.py: point to point, differentiable). `context_parallel`
(model.py) runs a whole `TransformerLM` that way: each rank passes its chunk of the tokens.
"""

from .model import check_model, context_parallel
from .multipole import check_chunks, context_parallel_multipole_attention, exchanged_numel, make_plan

__all__ = ["check_chunks", "check_model", "context_parallel", "context_parallel_multipole_attention",
           "exchanged_numel", "make_plan"]
