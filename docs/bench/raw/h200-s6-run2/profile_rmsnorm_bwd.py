"""Kernel durations and gaps of one RMSNorm backward (dx + dw) at T = 4K, hidden 4096, per variant (torch.profiler)."""
import sys
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from kernels import rmsnorm as N

x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
dy = torch.randn_like(x)
w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
_, rstd = N._launch_fwd(x, w, 1e-6, 0.0)
flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
for v in sys.argv[1].split(","):
    for _ in range(3):
        N._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant=v)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            flush.zero_()
            N._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant=v)
        torch.cuda.synchronize()
    ev = sorted([e for e in prof.events() if e.device_type.name == "CUDA"], key=lambda e: e.time_range.start)
    rows = [(e.name[:28], e.time_range.start, e.time_range.end) for e in ev if "fill" not in e.name and "zero" not in e.name.lower() and "elementwise" not in e.name]
    out = []
    for (n1, s1, e1), (n2, s2, e2) in zip(rows[::2], rows[1::2]):
        out.append((e1 - s1, s2 - e1, e2 - s2))
    med = [sorted(c)[len(c) // 2] for c in zip(*out)]
    print(f"{v:24s} bwd kernel {med[0]:6.1f} us  gap {med[1]:5.1f} us  reduce kernel {med[2]:5.1f} us  "
          f"(span {med[0] + med[1] + med[2]:.1f})", flush=True)
