"""Launching a Triton kernel without the JIT's per-call dispatch, for host-bound calls.

Why. ``kernel[grid](*args)`` binds the arguments, works out each one's specialization and looks the
compiled kernel up on every call: ~69 us of host time for the ~45 arguments of the KV cache's decode
kernel on the H100 machine's host, against ~19 us through the compiled kernel's own launcher
(``python -m experiments.bench_kvcache --host``). A decode step at short contexts is host-bound, so
that difference is the step's.

How. The first launch of a specialization goes through the JIT (which compiles the kernel or finds
it, and launches it) and keeps the compiled kernel it returns; a later launch whose arguments
specialize the same way calls that kernel's launcher. The key holds everything Triton specializes
on: each int's value (which decides ``== 1``, divisibility by 16 and 32 or 64 bits; the ints here
are shapes, strides and plan sizes, which repeat from call to call), each tensor's dtype and whether
its address is 16-byte aligned, each bool, None or string, and every keyword (constexprs and launch
options). Floats are not specialized: they are passed as they are. Under the interpreter there is
no compiled kernel: every launch goes through the JIT.

The compiled kernel's launcher (``CompiledKernel.__getitem__``) is Triton's own, not a documented
API: if it is missing or fails, the launcher falls back to the JIT for good (and says so once).
"""

from __future__ import annotations

import inspect
import warnings

import torch

from .checks import interpreter_enabled

MAX_SPECIALIZATIONS = 64  # per kernel; past that the memo starts again (keys should repeat)


def _spec(a):
    t = type(a)
    if t is int or t is bool or a is None or t is str:
        return (t, a)
    if t is float:
        return float
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    raise TypeError(f"FastLauncher: no rule for an argument of type {t.__name__}")


class FastLauncher:
    """``FastLauncher(kernel)(grid, *args, **kwargs)`` launches as ``kernel[grid](*args, **kwargs)``
    does. ``args`` must be every parameter up to the first keyword; ``kwargs`` the rest of the
    parameters (constexprs) and the launch options (num_warps, num_stages, maxnreg, ...)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        # (under the interpreter, which triton.jit chose at import, there is no compiled kernel)
        self.broken = interpreter_enabled()

    def __call__(self, grid, *args, **kwargs):
        if self.broken:
            return self.kernel[grid](*args, **kwargs)
        key = (tuple(map(_spec, args)), tuple((k, _spec(v)) for k, v in kwargs.items()))
        hit = self.compiled.get(key)
        if hit is not None:
            compiled, rest = hit
            try:
                return compiled[grid](*args, *rest)
            except Exception as err:  # noqa: BLE001 - Triton's internals moved: the JIT from now on
                self.broken = True
                warnings.warn(f"FastLauncher: the compiled kernel's launcher failed ({type(err).__name__}: {err}); "
                              "launching through the JIT from now on", RuntimeWarning, stacklevel=2)
                return self.kernel[grid](*args, **kwargs)
        compiled = self.kernel[grid](*args, **kwargs)
        fn = getattr(self.kernel, "fn", None)
        if compiled is None or fn is None or not hasattr(compiled, "__getitem__"):
            self.broken = True
            return compiled
        if len(self.compiled) >= MAX_SPECIALIZATIONS:
            self.compiled.clear()
        # the launcher takes every parameter in order (as the JIT binds them): those past the
        # positional ones by keyword, or their defaults
        rest = list(inspect.signature(fn).parameters.values())[len(args):]
        self.compiled[key] = (compiled, [kwargs.get(p.name, p.default) for p in rest])
        return compiled


__all__ = ["FastLauncher", "MAX_SPECIALIZATIONS"]
