"""Point-to-point exchange as an autograd function: forward sends tensors to peers, backward sends their
gradients back.

Every rank calls `exchange` with the same plan shape (who sends how much to whom is known to both ends),
so each forward message has a matching receive and, in backward, the reverse message has one too. The
function returns a 0-dim zero `anchor` besides the received tensors; adding it to the result keeps the
exchange in the autograd graph on a rank that receives nothing (the first rank, causal), so that its
backward still runs and answers the gradients its peers send back. Exchanges of successive layers are
ordered by their data dependencies, the same on every rank, so the blocking backward never deadlocks.
"""

import torch
import torch.distributed as dist


def _global(group, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _post(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]], group) -> None:
    """Post every isend and irecv as one batch, then wait for all (peers are ranks within `group`). One
    batch (`batch_isend_irecv`: one NCCL group call) cannot deadlock on a pair that sends both ways, as
    bidirectional FMA's neighbours do; separate NCCL sends could, each waiting for its receive."""
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), _global(group, peer), group) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, tensor, _global(group, peer), group) for peer, tensor in receives]
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, send_peers, receive_peers, receive_shapes, like, *send_tensors):
        received = [like.new_empty(shape) for shape in receive_shapes]
        _post(list(zip(send_peers, send_tensors)), list(zip(receive_peers, received)), group)
        ctx.group, ctx.send_peers, ctx.receive_peers = group, send_peers, receive_peers
        ctx.send_shapes = [tensor.shape for tensor in send_tensors]
        return (like.new_zeros(()), *received)

    @staticmethod
    def backward(ctx, _anchor_grad, *received_grads):
        send_grads = [received_grads[0].new_empty(shape) if received_grads else _anchor_grad.new_empty(shape)
                      for shape in ctx.send_shapes]
        _post(list(zip(ctx.receive_peers, received_grads)), list(zip(ctx.send_peers, send_grads)), ctx.group)
        return (None, None, None, None, None, *send_grads)


def exchange(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, tuple]], like: torch.Tensor,
             group=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """sends: (peer, tensor) pairs; receives: (peer, shape) pairs, at most one each way per peer, in
    like's dtype and device -> (anchor, the received tensors). Differentiable: the gradient of a received
    tensor goes back to its sender and lands on the tensor it sent. Add `anchor` (a zero) to a result."""
    anchor, *received = _Exchange.apply(group, [p for p, _ in sends], [p for p, _ in receives],
                                        [tuple(s) for _, s in receives], like, *[t for _, t in sends])
    return anchor, received
