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
    """What Triton specializes a runtime argument on (NVIDIA): an int's or a bool's value decides
    == 1, divisibility by 16 and its width; a tensor by dtype and 16-byte alignment; a float never."""
    t = type(a)
    if t is int or t is bool or a is None or t is str:
        return (t, a)
    if t is float:
        return float
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    raise TypeError(t.__name__)


class FastLauncher:
    """``FastLauncher(kernel)(grid, *args, **kwargs)`` launches as ``kernel[grid](*args, **kwargs)``
    does, ``grid`` a tuple. Keywords may name constexpr parameters and launch options only (their
    values are part of the key; a runtime argument by keyword would be frozen at its first value,
    so it is refused)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        params = getattr(kernel, "params", None)
        # (under the interpreter, which triton.jit chose at import, there is no compiled kernel)
        self.broken = interpreter_enabled() or params is None or not hasattr(kernel, "fn")
        if not self.broken:
            self.names = [p.name for p in params]
            self.index = {name: i for i, name in enumerate(self.names)}
            self.constexpr = [bool(getattr(p, "is_constexpr", False)) for p in params]
            self.first_constexpr = self.constexpr.index(True) if True in self.constexpr else len(params)
            self.checked = set()  # keyword names found to be constexprs or launch options
            self.defaults = [p.default for p in inspect.signature(kernel.fn).parameters.values()]

    def _key(self, args, kwargs):
        first_constexpr = self.first_constexpr
        if len(args) > first_constexpr:  # (constexprs by value)
            key = [a if i >= first_constexpr and self.constexpr[i] else _spec(a) for i, a in enumerate(args)]
        else:  # the usual case, inline: the key is most of this launcher's own host time
            key = [a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                   else _spec(a) for a in args]
        names = tuple(kwargs)
        if names not in self.checked:
            for name in names:
                i = self.index.get(name, -1)
                if i >= 0 and not self.constexpr[i]:
                    raise TypeError(f"the runtime argument {name} by keyword")
                if isinstance(kwargs[name], torch.Tensor):
                    raise TypeError(f"a tensor by keyword ({name})")
            self.checked.add(names)
        # (a compiled kernel is loaded on one device)
        return (len(args), torch.cuda.current_device(), tuple(kwargs.items()), *key)

    def __call__(self, grid, *args, **kwargs):
        if self.broken or not isinstance(grid, tuple) or not 1 <= len(grid) <= 3:
            return self.kernel[grid](*args, **kwargs)
        try:
            key = self._key(args, kwargs)
        except TypeError:  # (an argument of a type without a rule here: Triton's own dispatch decides)
            return self.kernel[grid](*args, **kwargs)
        compiled = self.compiled.get(key)
        if compiled is not None:
            # the launcher takes every parameter in order (as the JIT binds them): those past the
            # positional ones by keyword, or their defaults
            rest = [kwargs.get(name, default) for name, default in zip(self.names[len(args):],
                                                                      self.defaults[len(args):])]
            try:
                runner = compiled[grid + (1,) * (3 - len(grid))]
            except Exception as err:  # noqa: BLE001 - Triton's internals moved: the JIT from now on
                self.broken = True
                warnings.warn(f"FastLauncher: the compiled kernel's launcher failed ({type(err).__name__}: {err}); "
                              "launching through the JIT from now on", RuntimeWarning, stacklevel=2)
                return self.kernel[grid](*args, **kwargs)
            try:
                return runner(*args, *rest)
            except TypeError as err:  # (the launcher parses its arguments before it launches)
                self.broken = True
                warnings.warn(f"FastLauncher: the compiled kernel's launcher refused its arguments ({err}); "
                              "launching through the JIT from now on", RuntimeWarning, stacklevel=2)
                return self.kernel[grid](*args, **kwargs)
        compiled = self.kernel[grid](*args, **kwargs)
        if compiled is None or not hasattr(compiled, "__getitem__"):
            self.broken = True
            return compiled
        if len(self.compiled) >= MAX_SPECIALIZATIONS:
            self.compiled.clear()
        self.compiled[key] = compiled
        return compiled


__all__ = ["FastLauncher", "MAX_SPECIALIZATIONS"]
