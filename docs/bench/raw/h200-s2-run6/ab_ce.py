"""Throwaway A/B: session-1 vs current fused linear CE, frozen weight, fwd+bwd, H200 (not committed)."""
import importlib.util, sys, time, torch
sys.path.insert(0, ".")
from kernels import cross_entropy as new
spec = importlib.util.spec_from_file_location("ce_old", ".device-data/ce_old.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
V, E = 151936, 4096
w = torch.randn(V, E, device="cuda", dtype=torch.bfloat16) * 0.02
for T in (4096, 16384):
    h = torch.randn(T, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lab = torch.randint(0, V, (T,), device="cuda")
    for name, mod in (("old", old), ("new", new), ("old", old), ("new", new)):
        f = lambda: torch.autograd.grad(mod.fused_linear_cross_entropy(h, w, lab)[0], h)
        for _ in range(3): f()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(10): f()
        torch.cuda.synchronize(); print(f"T={T} {name}: {(time.perf_counter()-t0)/10*1e3:.2f} ms", flush=True)
