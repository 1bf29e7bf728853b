"""Time FMA's learned downsampling on its own, fused (Triton) against the torch path, on CUDA.

    python scripts/bench_downsample.py [--n 65536] [--batch 2] [--heads 8] [--dim 64] [--block-size 64]
        [--rank 2] [--kind groupedconv|avgpool|conv|multilevel] [--dtype bf16|fp32]

The input is a non-contiguous view [batch, heads, n, d] of a qkv-like projection, as in the model;
gradients are taken with torch.autograd.grad (of x and the parameters, nothing accumulated). Prints
median milliseconds (triton.testing.do_bench) of forward and of forward + backward for both paths
(the torch path alone for the kind without a fused kernel: conv),
and the floor of forward + backward (x read twice, dx written, summaries written and read, at the
H200's ~4.3 TB/s), as quoted in fma/downsample/fused.py.
"""

import argparse

import torch

from fma.downsample import DOWNSAMPLE_KINDS, FUSED_KINDS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("n", 65536), ("batch", 2), ("heads", 8), ("dim", 64), ("block-size", 64), ("rank", 2)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--kind", choices=DOWNSAMPLE_KINDS, default="groupedconv")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_downsample.py needs a CUDA GPU")
    from triton.testing import do_bench

    from fma.downsample import Downsample
    from fma.downsample.fused import Layout, split_levels

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    n, m, p = args.n, args.block_size, args.rank
    module = Downsample(args.kind, head_dim=args.dim, block_size=m, rank=p, max_seq_len=n).cuda()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.01 * torch.randn_like(param))
    qkv = torch.randn(args.batch, n, 3, args.heads, args.dim, device="cuda", dtype=dtype)
    x = qkv[:, :, 1].permute(0, 2, 1, 3).detach().requires_grad_()  # non-contiguous, as in the layer
    wrt = [x, *module.parameters()]
    layout = Layout.of(n, m, p)
    grad = torch.randn(args.batch, args.heads, layout.total, args.dim, device="cuda", dtype=dtype)
    for backend in ("triton", "torch") if args.kind in FUSED_KINDS else ("torch",):
        def forward():
            return module(x, None, backend=backend)[0]

        def forward_backward():
            out = forward()
            torch.autograd.grad(out, wrt, [g.to(o.dtype) for g, o in zip(split_levels(grad, m, p), out)])

        print(f"{backend}: forward {do_bench(forward, return_mode='median'):.3f} ms, forward + backward "
              f"{do_bench(forward_backward, return_mode='median'):.3f} ms")
    elem = torch.finfo(dtype).bits // 8
    x_bytes, s_bytes = args.batch * args.heads * n * args.dim * elem, args.batch * args.heads * layout.total * args.dim * elem
    print(f"floor of forward + backward: {(3 * x_bytes + 2 * s_bytes) / 4.3e12 * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
