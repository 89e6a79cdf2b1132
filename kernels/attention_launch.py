"""Cheaper Triton launches for the attention kernels: after the first normal launch, call the compiled kernel.

Why: Triton 3.6's ``kernel[grid](...)`` binds and specialises every argument in Python, builds a string cache
key and calls two empty launch-hook chains on every launch: tens of microseconds of host time, and one varlen
fwd+bwd makes ~5 launches. On 4K-token packs of short examples called eagerly that host time, not the GPU,
decides the speed. ``launch`` keeps the normal path for the first call of each specialisation (it compiles and
returns the ``CompiledKernel``), then launches through ``CompiledKernel.run`` with the arguments in parameter
order, exactly as ``JITFunction.run`` does at its end, skipping only the work whose answer is already known.

The key covers everything Triton specialises on (read from triton 3.6 ``runtime/jit.py`` and the native
``specialize_impl``): per tensor its dtype and whether its data pointer is 16-byte aligned; per int whether it
is 1 (a constexpr then), whether it is divisible by 16, and its width class (i32 / i64 / u64); bools and floats
by type; every constexpr value, ``num_warps``, ``num_stages``; the kernel and the current device. Any other
argument type, a Triton version other than the studied one, a launch hook or pre-run hook (profilers), debug
mode, an async-compile future, or a kernel whose parameters carry annotations or do_not_specialize flags: the
normal launch. Triton's check that the globals a kernel read have not changed since it compiled is skipped on
the direct path (ours read only module constants). If the direct call raises (it raises before the kernel is
enqueued), the kernel is taken off the direct path for the rest of the process and the call relaunches
normally: never silently wrong.

Not under TRITON_INTERPRET (the interpreter's kernels are not JITFunctions: always the normal path).
``set_direct_launch(False)`` turns the direct path off (tests compare both paths bitwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton

__all__ = [
    "STUDIED_TRITON",
    "direct_launch_enabled",
    "direct_launch_info",
    "launch",
    "set_direct_launch",
]

# The triton version whose JITFunction.run / CompiledKernel.run this module mirrors; any other: normal launches.
STUDIED_TRITON = "3.6.0"
# Distinct specialisations kept per process (a model has a handful per kernel); past it: normal launches.
MAX_KERNELS = 256

_I32 = (-(2**31), 2**31)
_I64 = (-(2**63), 2**63)

_state: dict[str, Any] = {"enabled": True, "ready": None, "why_off": None, "direct": 0, "normal": 0}
_kernels: dict[tuple, tuple[Any, tuple]] = {}  # key -> (CompiledKernel, constexpr values)
_refused: dict[int, tuple[Any, str]] = {}  # id(kernel) -> (kernel, why it stays on the normal path)
_rt: dict[str, Any] = {}  # triton runtime pieces resolved once: device/stream getters, knobs, CompiledKernel
_key_fns: dict[tuple, Any] = {}  # argument types -> generated key function (see _key_fn)
_accepted: set[int] = set()  # id() of kernels known to be JITFunctions (skips an isinstance per launch)


def set_direct_launch(enabled: bool) -> None:
    """Turn the direct launch path on (default) or off. Either way it starts afresh: it forgets the compiled kernels
    it kept and the kernels it had sent back to the normal path."""
    _state["enabled"] = bool(enabled)
    _kernels.clear()
    _refused.clear()
    _accepted.clear()


def direct_launch_enabled() -> bool:
    return _state["enabled"]


def direct_launch_info() -> dict[str, Any]:
    """Counters and reasons, for tests and the launch benchmark."""
    return {
        "enabled": _state["enabled"], "ready": _state["ready"], "why_off": _state["why_off"],
        "direct": _state["direct"], "normal": _state["normal"], "kernels": len(_kernels),
        "refused": {getattr(fn, "__name__", repr(fn)): why for fn, why in _refused.values()},
    }  # fmt: skip


def _ready() -> bool:
    """Resolve the triton runtime pieces once; False (with a reason) if this triton is not the studied one."""
    if _state["ready"] is not None:
        return _state["ready"]
    ok, why = False, None
    if triton.__version__ != STUDIED_TRITON:
        why = f"triton {triton.__version__} is not the studied {STUDIED_TRITON}"
    elif not torch.cuda.is_available():
        why = "no CUDA device"
    else:
        try:
            from triton import knobs
            from triton.compiler.compiler import CompiledKernel
            from triton.runtime.driver import driver
            from triton.runtime.jit import JITFunction

            _rt.update(
                device=driver.active.get_current_device, stream=driver.active.get_current_stream, knobs=knobs,
                CompiledKernel=CompiledKernel, JITFunction=JITFunction,
            )  # fmt: skip
            ok = True
        except (ImportError, AttributeError) as err:  # a layout other than the studied one
            why = f"triton runtime layout differs: {err}"
    _state["ready"], _state["why_off"] = ok, why
    return ok


def _refuse_reason(fn: Any, n_args: int, constexprs: dict[str, Any]) -> str | None:
    """Why ``fn`` cannot take the direct path with this call layout (None: it can)."""
    params = fn.params
    if [p.name for p in params[n_args:]] != list(constexprs):
        return f"constexprs {list(constexprs)} are not the kernel's parameters after the {n_args} runtime ones"
    for i, p in enumerate(params):
        if p.is_constexpr != (i >= n_args):
            return f"parameter {p.name}: runtime arguments must come first, constexprs last"
        if not p.is_constexpr and (p.annotation_type or p.is_const or p.do_not_specialize
                                   or p.do_not_specialize_on_alignment):  # fmt: skip
            return f"parameter {p.name} has an annotation or a specialisation flag"
    return None


def _hooks_idle() -> bool:
    rt = _rt["knobs"].runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return not rt.debug


def _key_source(types: tuple[type, ...]) -> str | None:
    """Source of a function that maps runtime arguments of these types to what Triton specialises on; None for an
    argument type we do not model (numpy or torch scalars, None, strings...: the normal launch decides)."""
    parts = []
    for i, t in enumerate(types):
        a = f"a[{i}]"
        if t is int:  # 1 is a constexpr for Triton; 8 is apart from every width (0/2/4) + divisible (0/1) code
            parts.append(f"8 if {a} == 1 else ({a} % 16 == 0) + (0 if {_I32[0]} <= {a} < {_I32[1]} else 2 if "
                         f"{_I64[0]} <= {a} < {_I64[1]} else 4)")  # fmt: skip
        elif t is float or t is bool:
            parts.append("0")  # Triton specialises these by type alone, and the types are part of the key
        elif issubclass(t, torch.Tensor):
            parts.append(f"{a}.dtype, {a}.data_ptr() % 16 == 0")
        else:
            return None
    return "def key(a):\n    return (" + ", ".join(f"({p})" for p in parts) + ",)\n"


def _key_fn(types: tuple[type, ...]) -> Any:
    """The key function for this tuple of argument types, generated once (a Python loop with a type switch per
    argument costs ~3x more host time than straight-line code: the per-launch saving would shrink)."""
    fn = _key_fns.get(types)
    if fn is None:
        src = _key_source(types)
        if src is None:
            fn = _unmodelled
        else:
            namespace: dict[str, Any] = {}
            exec(compile(src, "<attention_launch key>", "exec"), namespace)  # our own generated source, no input
            fn = namespace["key"]
        _key_fns[types] = fn
    return fn


def _unmodelled(_args: tuple) -> None:
    return None


def _arg_key(args: Sequence[Any]) -> tuple | None:
    """What Triton specialises on, per runtime argument (types included); None for a type we do not model."""
    types = tuple(map(type, args))
    key = _key_fn(types)(tuple(args))
    return None if key is None else (types, key)


def launch(
    fn: Any, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any], num_warps: int, num_stages: int
) -> None:
    """``fn[grid](*args, **constexprs, num_warps=..., num_stages=...)``, through the compiled kernel when known.

    ``args``: the runtime arguments in parameter order; ``constexprs``: every constexpr parameter by name, in
    parameter order (the direct path passes their values positionally after ``args``).
    """
    fid = id(fn)  # kernels are module-level objects that live as long as the process; id() hashes fastest
    if not _state["enabled"] or fid in _refused or not (_state["ready"] or _ready()):
        return _normal(fn, grid, args, constexprs, num_warps, num_stages)
    if fid not in _accepted:
        if not isinstance(fn, _rt["JITFunction"]):
            _refused[fid] = (fn, f"{type(fn).__name__} is not a JITFunction")
            return _normal(fn, grid, args, constexprs, num_warps, num_stages)
        _accepted.add(fid)
    arg_key = _arg_key(args)
    if arg_key is None or fn.pre_run_hooks or not _hooks_idle():
        return _normal(fn, grid, args, constexprs, num_warps, num_stages)
    consts = tuple(constexprs.values())
    device = _rt["device"]()
    # Constexpr types too: True == 1 and hash alike, but Triton keys them apart.
    key = (fid, device, consts, tuple(map(type, consts)), num_warps, num_stages, arg_key)
    try:
        hit = _kernels.get(key)
    except TypeError:  # an unhashable constexpr value: Triton's own path handles it
        return _normal(fn, grid, args, constexprs, num_warps, num_stages)
    if hit is None:
        kernel = _normal(fn, grid, args, constexprs, num_warps, num_stages)
        why = _refuse_reason(fn, len(args), constexprs)
        if why is not None:
            _refused[fid] = (fn, why)
        elif isinstance(kernel, _rt["CompiledKernel"]) and len(_kernels) < MAX_KERNELS:
            _kernels[key] = (kernel, consts)
        return None
    kernel = hit[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        # CompiledKernel.run is the launcher JITFunction.run ends with (it loads the binary on first use). Metadata
        # and hooks None: the hook chains are empty (checked above), and the launcher skips None hooks.
        kernel.run(grid[0], g1, g2, _rt["stream"](device), kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *consts)  # fmt: skip
    except Exception as err:  # it raised before enqueueing: this kernel goes back to the normal path
        _refused[fid] = (fn, f"direct launch raised {type(err).__name__}: {err}")
        _kernels.pop(key, None)
        return _normal(fn, grid, args, constexprs, num_warps, num_stages)
    _state["direct"] += 1
    return None


def _normal(fn: Any, grid: tuple, args: tuple, constexprs: dict[str, Any], num_warps: int, num_stages: int) -> Any:
    _state["normal"] += 1
    return fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
