"""A whole language model context-parallel: `with context_parallel(model, group): model(chunk_of_tokens)`."""

import contextlib
import functools

import torch.distributed as dist
from torch import nn

from ..errors import ConfigurationError
from ..layer import AttentionLayer
from ..multipole import FastMultipoleAttention
from .multipole import check_chunks, context_parallel_multipole_attention


def _attend(layer, group, q, k, v, padding_mask):
    if padding_mask is not None:
        raise ConfigurationError("Context-parallel FMA takes no padding_mask: pad the sequence to a valid length "
                                 "with the pads masked as targets, or run it on one process.")
    return context_parallel_multipole_attention(q, k, v, layer=layer, group=group)


def check_model(model: nn.Module, seq_len: int | None = None, world: int | None = None) -> list[FastMultipoleAttention]:
    """model's FMA layers; refused (ConfigurationError naming the fix) if it has attention of another kind,
    no `embed(tokens, start)` or, given seq_len and world, if seq_len does not split into chunks every layer
    can run (`check_chunks`, and the learned summaries' max_seq_len)."""
    others = sorted({type(module).__name__ for module in model.modules()
                     if isinstance(module, AttentionLayer) and not isinstance(module, FastMultipoleAttention)})
    if others:
        raise ConfigurationError(f"Context parallelism is implemented for FMA only; this model has "
                                 f"{', '.join(others)} attention. Use model=fma, or run on one process.")
    if not hasattr(model, "embed"):
        raise ConfigurationError(f"{type(model).__name__} has no embed(tokens, start): context_parallel cannot "
                                 f"offset its positions by the rank's chunk.")
    layers = [module for module in model.modules() if isinstance(module, FastMultipoleAttention)]
    if seq_len is not None:
        if seq_len % world:
            raise ConfigurationError(f"Context parallelism splits each sequence into {world} equal chunks; "
                                     f"data.seq_len={seq_len} is not a multiple of {world}. Set data.seq_len= a "
                                     f"multiple of {world} x model.attention.block_size.")
        for layer in layers:
            check_chunks(seq_len // world, world, layer.block_size)
            layer.check_length(seq_len)
    return layers


@contextlib.contextmanager
def context_parallel(model: nn.Module, group=None):
    """Within the block, `model(tokens)` with tokens [batch, c] this rank's chunk of a sequence (positions
    rank c .. (rank + 1) c - 1, the sequence's length n = world c valid for FMA) gives this rank's rows of
    the single-process model's output: every FMA layer attends through
    `context_parallel_multipole_attention`, and positions start at rank c (the model's `embed(tokens,
    start)`, e.g. `models.transformer.TransformerLM`). Every position-wise part (norms, MLPs, the head)
    needs nothing from other ranks. Attention of any other kind is refused: it would see only the chunk.
    Gradients of the parameters are each rank's share; sum them over the group (DDP over it does).
    """
    layers = check_model(model)
    rank = dist.get_rank(group)
    embed = model.embed

    def offset_embed(tokens, start: int = 0):
        return embed(tokens, start + rank * tokens.shape[1])

    for layer in layers:
        layer.attend = functools.partial(_attend, layer, group)
    model.embed = offset_embed
    try:
        yield model
    finally:
        for layer in layers:
            del layer.attend
        del model.embed
