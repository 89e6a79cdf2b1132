"""Launch configurations and A/B variants of the RMSNorm kernels (``kernels/rmsnorm.py``).

Kept apart from the kernels so that one place decides every tuning choice (block sizes, warps, the persistent
grid, the register cap, and how the weight gradient is reduced) and a sweep can force any of them by name:
``set_default_variant("two_launch")`` flips what :func:`kernels.rmsnorm.rms_norm` uses; ``rms_norm(...,
variant=...)`` picks one for a single call. Nothing here reads the environment.

Variants (H200, bf16, CUDA-graph device time, % of copy with the default ``two_launch``: session 3 T = 4K fwd 85%
/ bwd 77%, 16K 95% / 92%, 64K 98% / 97%; the other variants were no faster, see ``_default``):
* ``two_launch``: run 4's behaviour. Persistent backward, then a second small kernel sums the per-program fp32
  partial dw rows in a fixed order.
* ``one_launch``: the same backward loop; after its rows each program stores its partial row, takes a ticket
  (an acq_rel atomic on an int32 counter) and the last ``reducers`` programs to arrive each sum a slab of
  columns of the partial rows in program order (deterministic) and write dw; the last of them zeroes the
  counter, so a CUDA graph can replay it. Why several reducers: at E 4096 the partials are 256 x 16 KB = 4 MB,
  which one SM reads from L2 at ~50-100 GB/s (40-80 us); 128 reducers read 32 KB each (one tile, ~1 us);
  per-head E 128: 512 x 512 B over 16 reducers of 8 columns. Saves the second launch (~2-3 us of the 32 us
  backward at T = 4K). The grid is also "balanced": the fewest programs with the same tiles per program
  (T = 4K: 256 programs x 16 rows instead of 264 x 15-16), 3% fewer partial rows.
* ``one_launch_r16`` / ``one_launch_last``: 16 reducers / only the last program sums all partials (the plain
  last-arriver design; expected slow at E 4096, kept to measure the reducer count's effect).
* ``*_fwd_w4`` / ``*_fwd_r2``: forward with half the warps per program (32 elements a thread: E 4096 -> 4 warps,
  more programs resident per SM) or twice the rows per program at 16 elements a thread (E 4096 -> 2 rows x 16
  warps, half the programs; per-head 64 x 128): the small-T forward A/B (run 4: 84% of copy at T = 4K).
* ``two_launch_pdl``: ``two_launch`` with programmatic dependent launch on every kernel (sm_90+, CUDA only):
  each kernel is launched with the PDL attribute, waits (``griddepcontrol.wait``) for the kernel before it to
  finish and flush before touching memory, and at once allows the next one to launch. So the launch and CTA
  dispatch of a kernel overlap the tail of the one before it (the ~3 us of ramp and tail that keep T = 4K under
  90% of copy), while every load and store still happens after the previous kernel is complete: same values.
  It gains only where the kernel before also lets dependents launch early (our kernels, or a chain of norms);
  after a cuBLAS GEMM the launch waits for the GEMM's end as usual.
* ``one_launch_fwd_persistent``: forward as a persistent grid of 4 programs per SM (8 warps, ~40-50 registers:
  they fit) that prefetch their next row block: no per-row program dispatch, 4 x 2 x 8 KB in flight per SM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import triton

__all__ = [
    "VARIANTS",
    "BwdConfig",
    "Variant",
    "bwd_config",
    "default_variant",
    "fwd_config",
    "get_variant",
    "register_cap",
    "set_default_variant",
]


@dataclass(frozen=True)
class Variant:
    """One selectable set of RMSNorm tuning choices (see the module docstring)."""

    name: str
    one_launch: bool  # dw partial rows summed inside the backward kernel (ticket + last arrivers)
    reducers: int = 0  # one_launch: most programs that split the final dw sum (1 = the last program alone)
    balanced: bool = False  # backward grid: fewest programs with the same row blocks per program
    fwd_elements: int = 4096  # forward: about this many elements per program (whole rows, at least one)
    fwd_per_thread: int | None = None  # forward: elements per thread, which sets the warps (None: run 4's rule)
    fwd_programs_per_sm: int = 0  # forward: persistent grid of this many programs per SM (0: one per row block)
    pdl: bool = False  # programmatic dependent launch (Hopper+): launch while the previous kernel drains


_BASE = {
    "two_launch": Variant("two_launch", one_launch=False),
    "one_launch": Variant("one_launch", one_launch=True, reducers=256, balanced=True),
    "one_launch_r16": Variant("one_launch_r16", one_launch=True, reducers=16, balanced=True),
    "one_launch_last": Variant("one_launch_last", one_launch=True, reducers=1, balanced=True),
}
VARIANTS: dict[str, Variant] = {
    **_BASE,
    "one_launch_fwd_w4": replace(_BASE["one_launch"], name="one_launch_fwd_w4", fwd_per_thread=32),
    "one_launch_fwd_persistent": replace(_BASE["one_launch"], name="one_launch_fwd_persistent", fwd_programs_per_sm=4),
    "one_launch_fwd_r2": replace(_BASE["one_launch"], name="one_launch_fwd_r2", fwd_elements=8192, fwd_per_thread=16),
    "two_launch_pdl": replace(_BASE["two_launch"], name="two_launch_pdl", pdl=True),
}

# Two launches by default: the H200 A/B (session 3, tools/bench_rmsnorm_variants.py) timed the one-launch backward
# slightly slower at every T (hidden 4096: 31.4 vs 30.7 us at 4K, 104.6 vs 103.0 us at 16K): the reducers' wait
# for the last programs costs what the saved launch gains. No forward variant beat the default forward either.
# With programmatic dependent launch (session 4, H200 A/B in one process): T = 4K hidden fwd 18.5 -> 17.5 us
# (86% -> 90% of copy), per-head 18.0 -> 17.4 us fwd and 31.7 -> 30.1 us bwd, 16K fwd 66.5 -> 65.5 us; nothing
# slower by more than 0.3 us; a chain of PDL norms captured in a CUDA graph is bitwise equal to plain launches.
_default = "two_launch_pdl"


def get_variant(name: str | None = None) -> Variant:
    """The variant called ``name`` (None: the current default)."""
    key = _default if name is None else name
    if key not in VARIANTS:
        raise ValueError(f"unknown RMSNorm variant {key!r}: expected one of {sorted(VARIANTS)}.")
    return VARIANTS[key]


def default_variant() -> str:
    return _default


def set_default_variant(name: str) -> str:
    """Make ``name`` the variant :func:`kernels.rmsnorm.rms_norm` uses; returns the previous default."""
    global _default
    get_variant(name)  # validates
    previous, _default = _default, name
    return previous


# --------------------------------------------------------------------------------------------------- forward
def fwd_config(n_cols: int, elements: int = 4096, per_thread: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, num_warps): about ``elements`` per program, ``per_thread`` elements a thread (None:
    4 warps below 2048 elements a program, 8 below 16384, else 16).

    Default: E 4096 -> 1 row x 4096 with 8 warps (16 elements, two 16-byte loads per thread); per-head E 128 ->
    32 rows per program so that small rows still make wide programs. Register counts (Triton 3.6, sm_90): E 4096
    at 8 warps takes 64 registers x 256 threads, so 4 programs (32 KB of loads) fit per SM; per-head 32 x 128 at
    8 warps 80 registers, 3 programs (24 KB). H200 run 1 at T = 64K: 95-96% of copy for both.
    """
    block_e = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, elements // block_e))
    program = block_r * block_e
    if per_thread is None:
        return block_r, block_e, 16 if program >= 16384 else 8 if program >= 2048 else 4
    return block_r, block_e, max(1, min(16, triton.next_power_of_2(max(1, program // (per_thread * 32)))))


# -------------------------------------------------------------------------------------------------- backward
class BwdConfig(NamedTuple):
    """Launch configuration of the backward (see :func:`bwd_config`)."""

    block_r: int  # rows per tile
    block_e: int  # next power of two >= E
    num_warps: int
    prefetch: bool  # load the next tile before computing the current one
    programs: int  # persistent grid size (one wave)
    maxnreg: int  # register cap that makes ``programs_per_sm`` programs fit on an SM
    reduce_block_p: int  # partial rows per step of the dw reduction (kernel or in-kernel epilogue)
    reduce_block_c: int  # columns per program (two_launch) or per reducer slab (one_launch)


# Registers per SM on sm_80/sm_90 (and the CPU stand-in): the budget the register caps below divide.
REGS_PER_SM = 65536
# one_launch reduction tiles: a reducer sums a slab of columns over the partial rows, at most 32 fp32 values a
# thread per tile (no spill under the 128-register cap), so up to 32 x threads / slab rows take one round of loads.
_ONE_LAUNCH_VALUES_PER_THREAD = 32


def one_launch_slab(n_cols: int) -> int:
    """Columns per reducer slab: 32 fp32 (one 128-byte line of each partial row) for wide rows, fewer for narrow
    ones so that small E still splits over several reducers (per-head E 128 -> 8 columns, 16 reducers)."""
    return max(8, min(32, triton.next_power_of_2(n_cols) // 16))


def register_cap(programs_per_sm: int, num_warps: int) -> int:
    """Registers per thread that let ``programs_per_sm`` programs of ``num_warps`` warps share an SM."""
    return min(255, REGS_PER_SM // (programs_per_sm * num_warps * 32)) // 8 * 8  # ptxas allocates in 8s


def bwd_config(n_rows: int, n_cols: int, sms: int, balanced: bool = False, one_launch: bool = False) -> BwdConfig:
    """The backward's launch configuration, a pure function of (rows, E, SM count, variant knobs).

    Bytes in flight per SM are what a memory-bound loop needs (~4.2 TB/s x ~1 us / 132 SMs ~ 32 KB): the tile
    each resident program has loaded plus PREFETCH (the next tile's loads stay out while the current one
    computes). Register counts (Triton 3.6 offline compile for sm_90, E a constexpr, dx and dw):
    * wide rows (E >= 1024): one row per tile, 16 elements per thread (E 4096 -> 8 warps), prefetch on: 124-128
      registers (cap 128, no spill), 2 programs x (16 KB loaded + 16 KB prefetched) per SM. E 8192: 16 warps,
      1 program; E 2048: 4 warps, 4 programs.
    * narrow rows (per-head E 128; 64, 256): 2048 elements per tile (E 128 -> 16 rows), 4 warps, prefetch on:
      122-128 registers, 4 programs per SM; E 64 needs up to 151, so 3 programs (cap 168).
    The register cap is always set, so the occupancy the persistent grid is sized for is what the hardware gets:
    one wave (a second, partial wave would double the slowest SM's time). ``balanced`` then drops programs that
    would not lower the most row blocks any program handles (T = 4K, E 4096: 264 -> 256 programs, 16 rows each).
    One 16-warp program per SM instead (same threads, half the dw partial rows) was slower on the H200 (session
    5, run 5: T = 4K hidden backward 35.6 vs 30.7 us, frozen weight 31.4 vs 26.0): not an option here. Neither
    were (session 6, docs/bench/raw/h200-s6-run{1,2,3}) a cp.async pipeline of 2-8 row blocks in shared memory
    (the dx stream 0.7-2.7 us slower at T = 4K, 83-95% of copy at 16K/64K) or a 96/112-register cap that leaves
    the PDL-launched dw reduction resident beside the backward (no gain at 4K; cap 96 costs 5-13 us at 16K).
    The dx-only kernel (frozen weight) under a cap of 80 with 3 / 6 programs per SM (run 3) is 0.4-0.7 us faster
    at T = 4K but 4-11 us slower for the hidden norm at 16K/64K, so it keeps the same grid as the dw kernel.
    """
    block_e = triton.next_power_of_2(n_cols)
    if block_e >= 1024:
        block_r = 1
        num_warps = max(4, min(16, block_e // 512))  # 16 elements per thread up to E 8192
        per_sm = max(1, 16 // num_warps)
    else:
        block_r = max(1, 2048 // block_e)
        num_warps = 4
        per_sm = 4 if block_e >= 128 else 3  # E 64: 32 rows x 64 need up to 151 registers
    maxnreg = register_cap(per_sm, num_warps)
    n_blocks = triton.cdiv(max(n_rows, 1), block_r)
    programs = max(1, min(n_blocks, per_sm * sms))
    if balanced:
        programs = triton.cdiv(n_blocks, triton.cdiv(n_blocks, programs))
    if one_launch:
        reduce_c = one_launch_slab(n_cols)
        tile_rows = _ONE_LAUNCH_VALUES_PER_THREAD * 32 * num_warps // reduce_c
        reduce_p = max(1, min(triton.next_power_of_2(programs), tile_rows))
    else:
        # Separate kernel: 16 columns (64 B of each partial row) per program and all partial rows in one tile of
        # up to 512 x 16 fp32: one round of loads per program (~1-2 us); E 4096 -> 256 programs.
        reduce_c = 16
        reduce_p = max(1, min(triton.next_power_of_2(programs), 512))
    return BwdConfig(block_r, block_e, num_warps, True, programs, maxnreg, reduce_p, reduce_c)


def one_launch_reducers(programs: int, n_cols: int, wanted: int, sms: int, interpreted: bool) -> int:
    """Programs that split the in-kernel dw sum: at most ``wanted``, one per slab, one per program, one per SM.

    Every reducer but the last arrival spins until all programs have arrived. When it spins, all but fewer than
    ``reducers`` programs have exited, so the stragglers find free slots as long as the spinning reducers cannot
    fill the GPU: at most one per SM guarantees that whatever the grid (a swept ``programs`` may exceed a wave).
    Under Triton's CPU interpreter programs run one after another, so only the last one may wait: 1 reducer.
    """
    if interpreted:
        return 1
    return max(1, min(wanted, programs, sms, triton.cdiv(n_cols, one_launch_slab(n_cols))))
