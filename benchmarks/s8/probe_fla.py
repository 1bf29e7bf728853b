"""Session 8: why fla-core's chunk_simple_gla does not finish on the H200 (autotuning or a hang)."""
import faulthandler, os, sys, time
import torch
faulthandler.dump_traceback_later(float(os.environ.get("DUMP_AFTER", "50")), repeat=True, file=sys.stderr)
t0 = time.time()
def log(s): print(f"{time.time() - t0:7.1f}s {s}", flush=True)
log(f"torch {torch.__version__}")
import triton; log(f"triton {triton.__version__}")
from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd, chunk_simple_gla_bwd
import fla; log(f"fla imported {getattr(fla, '__version__', '?')}")
for n in [int(a) for a in sys.argv[1:]] or [4096]:
    b = max(1, 131072 // n)
    q, k, v = (torch.rand(b, n, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(v)
    for rep in range(3):
        torch.cuda.synchronize(); s = time.time()
        o, _ = chunk_simple_gla_fwd(q=q, k=k, v=v, g=None, g_gamma=None, scale=1.0, initial_state=None,
                                    output_final_state=False, cu_seqlens=None, chunk_size=64)
        torch.cuda.synchronize(); f = time.time()
        dq, dk, dv, _, _ = chunk_simple_gla_bwd(q=q, k=k, v=v, g=None, g_gamma=None, initial_state=None, do=do,
                                                dht=None, scale=1.0, cu_seqlens=None, chunk_size=64)
        torch.cuda.synchronize(); e = time.time()
        log(f"n={n} b={b} rep {rep}: fwd {1e3 * (f - s):.2f} ms, bwd {1e3 * (e - f):.2f} ms")
    ref = torch.tril(torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float())) @ v.float().transpose(1, 2) if n <= 4096 else None
    if ref is not None:
        err = (o.float().transpose(1, 2) - ref).norm() / ref.norm()
        log(f"n={n}: relative error vs float32 dense {err:.2e}")
log("done")
