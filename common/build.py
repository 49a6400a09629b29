"""The CUDA build: csrc/ -> one pybind11 extension, ``_sage_cuda``, compiled with nvcc through ninja.

Built on first use (JIT, as FlashInfer does) into a cache keyed by the sources, the flags and the
Python version: ``$SAGE_CACHE_DIR/cuda-<hash>/`` (default ``~/.cache/sageattention_repro``). A
second use, or another process, loads the cached module; ninja rebuilds only what changed.

* ``python -m common.build``           build (or find) the extension and print where it is;
* ``python -m common.build --check``   compile every CUDA/C++ source for sm_90a into object
  files and link them, without a GPU; non-zero exit on any error (CI runs it).

The extension does not link against torch (raw pointers and a stream handle cross the boundary;
see csrc/bindings.cpp), so one build serves any torch version. Without nvcc or ninja,
:func:`load` raises :class:`CudaBuildUnavailable` with what is missing, and the Triton backend
keeps working.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
MODULE = "_sage_cuda"
# every compile unit; the kernels carry no torch headers, the binding carries no CUDA device code
CUDA_SOURCES = ["sage2_sm90/attention.cu", "sage2_sm90/kv_pass.cu", "sage3_sm90/attention.cu", "decode/split_kv.cu", "common/exact_div_check.cu"]
CXX_SOURCES = ["bindings.cpp"]
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]  # wgmma and setmaxnreg need sm_90a
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler=-fPIC", "-lineinfo", *ARCH_FLAGS]
# flags of one compile unit (after NVCC_FLAGS, before $SAGE_NVCC_FLAGS). sage2's Hopper kernel at
# ptxas's register usage level 2 (of 0-10; 5 by default; 0-3 give the same SASS): fewer spills, and
# 2-4% faster non-causal calls on the H100 (csrc/NOTES.md, v13.6). The other units keep the
# default: their SASS is what was measured.
SOURCE_FLAGS = {"sage2_sm90/attention.cu": ["-Xptxas", "--register-usage-level=2"]}


def nvcc_flags() -> list[str]:
    """NVCC_FLAGS plus ``$SAGE_NVCC_FLAGS`` (tuning builds, e.g. ``-DSAGE_DECODE_STAGES=2``: each
    set of flags gets its own cache entry)."""
    return NVCC_FLAGS + os.environ.get("SAGE_NVCC_FLAGS", "").split()


def unit_flags(src: str) -> list[str]:
    """The flags one compile unit (a path under csrc/) is built with: the unit's own before
    ``$SAGE_NVCC_FLAGS``, so that a tuning build can override them (the last value wins)."""
    return NVCC_FLAGS + SOURCE_FLAGS.get(src, []) + os.environ.get("SAGE_NVCC_FLAGS", "").split()

_loaded = None
_build_failed: str | None = None


class CudaBuildUnavailable(RuntimeError):
    """This machine cannot build the CUDA extension (no nvcc, no ninja, or the build failed)."""


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc (or $CUDA_PATH), else nvcc on PATH, else /usr/local/cuda's."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for nvcc in ([Path(home) / "bin" / "nvcc"] if home else []) + [shutil.which("nvcc"), Path("/usr/local/cuda/bin/nvcc")]:
        if nvcc and Path(nvcc).exists():
            return str(nvcc)
    return None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import ninja  # the PyPI package ships the binary

        return str(Path(ninja.BIN_DIR) / "ninja")
    return None


def _includes() -> list[str]:
    import pybind11

    return [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def _sources() -> list[Path]:
    return [CSRC / s for s in CUDA_SOURCES + CXX_SOURCES]


def _fingerprint(nvcc: str) -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".cpp"):
            h.update(str(f.relative_to(CSRC)).encode())
            h.update(f.read_bytes())
    h.update(" ".join(nvcc_flags() + [nvcc, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]).encode())
    h.update(repr(sorted(SOURCE_FLAGS.items())).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("SAGE_CACHE_DIR") or Path.home() / ".cache" / "sageattention_repro"
    return Path(base)


def _write_ninja(build_dir: Path, nvcc: str) -> Path:
    """build.ninja: one object per source (dependency files from nvcc -MD), one link."""
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    flags = " ".join(NVCC_FLAGS + _includes())
    tuning = " ".join(os.environ.get("SAGE_NVCC_FLAGS", "").split())
    lines = [
        f"nvcc = {nvcc}",
        f"flags = {flags}",
        f"tuning = {tuning}",
        "rule cu",
        "  command = $nvcc $flags $unit_flags $tuning -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",  # host code through nvcc too: one compiler, one set of include paths
        "  command = $nvcc $flags $tuning -x cu -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        "  command = $nvcc -shared $in -o $out",
        "  description = link $out",
    ]
    objs = []
    for src in CUDA_SOURCES + CXX_SOURCES:
        obj = src.replace("/", "_") + ".o"
        objs.append(obj)
        rule = "cu" if src.endswith(".cu") else "cxx"
        lines.append(f"build {obj}: {rule} {CSRC / src}")
        if src in SOURCE_FLAGS:
            lines.append(f"  unit_flags = {' '.join(SOURCE_FLAGS[src])}")
    lines.append(f"build {MODULE}{ext}: link {' '.join(objs)}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return build_dir / f"{MODULE}{ext}"


def _run_ninja(build_dir: Path, verbose: bool) -> None:
    proc = subprocess.run([find_ninja(), "-C", str(build_dir)], capture_output=not verbose, text=True)
    if proc.returncode != 0:
        log = (proc.stdout or "") + (proc.stderr or "")
        raise CudaBuildUnavailable(f"the CUDA build failed in {build_dir}:\n{log[-6000:]}")


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks (empty: it can build)."""
    missing = []
    if not all(src.exists() for src in _sources()):
        missing.append(f"the CUDA sources under {CSRC} (install from a checkout: pip install -e .)")
    if find_nvcc() is None:
        missing.append("nvcc (install the CUDA toolkit, or set CUDA_HOME)")
    if find_ninja() is None:
        missing.append("ninja (pip install ninja)")
    if importlib.util.find_spec("pybind11") is None:
        missing.append("pybind11 (pip install pybind11)")
    return missing


def build_flag_variants(flags_by_name: dict[str, str]) -> dict[str, dict]:
    """Build the extension once per set of tuning flags (``$SAGE_NVCC_FLAGS``, each its own cache
    entry), in parallel processes; print each build's outcome. Returns the environment of every
    variant that built, for the processes that time it (experiments.*_variants)."""
    t0 = time.time()
    env_of = {name: dict(os.environ, SAGE_NVCC_FLAGS=flags) for name, flags in flags_by_name.items()}
    procs = {name: subprocess.Popen([sys.executable, "-m", "common.build"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for name, env in env_of.items()}
    built = {}
    for name, proc in procs.items():
        err = proc.communicate()[1]
        print(f"[build {name}] {'ok' if proc.returncode == 0 else 'FAILED'} ({time.time() - t0:.0f}s)", flush=True)
        if proc.returncode:
            print(err[-3000:])
        else:
            built[name] = env_of[name]
    return built


def build(verbose: bool = False) -> Path:
    """Build the extension (or find it in the cache); returns the module file."""
    missing = missing_tools()
    if missing:
        raise CudaBuildUnavailable("cannot build the CUDA kernels, missing: " + "; ".join(missing)
                                   + ". The Triton backend does not need them.")
    nvcc = find_nvcc()
    build_dir = cache_dir() / f"cuda-{_fingerprint(nvcc)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:  # one builder at a time per cache entry
        fcntl.flock(lock, fcntl.LOCK_EX)
        module = _write_ninja(build_dir, nvcc)
        if not module.exists():
            print(f"[sage] compiling the CUDA kernels into {build_dir} (first use; about a minute)...",
                  file=sys.stderr, flush=True)
            start = time.time()
            _run_ninja(build_dir, verbose)
            print(f"[sage] built in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        return module


def load():
    """The ``_sage_cuda`` module, built on first use. Raises CudaBuildUnavailable."""
    global _loaded
    if _loaded is None:
        path = build()
        loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
        spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _loaded = module
    return _loaded


def hopper(device) -> bool:
    """The kernels are built for sm_90a: Hopper GPUs only."""
    from .checks import device_capability

    return device.type == "cuda" and device_capability(device)[0] == 9


def current_stream_handle(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream, which the extension's launches take.
    torch's raw getter, where the build has it, saves building a torch.cuda.Stream (~5 us per call)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def on_device(device):
    """A context that makes ``device`` current where it is a CUDA device that is not (else nothing):
    the extension and Triton launch on the current device (and a capture check reads the current
    device's stream)."""
    import torch

    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def usable_for_auto(device, who: str) -> bool:
    """``backend="auto"`` may run a CUDA kernel on ``device``: a Hopper GPU, ``SAGE_DISABLE_CUDA``
    not set to 1, and the extension builds. A failed build warns once (naming ``who``), after
    which Triton runs."""
    global _build_failed
    if os.environ.get("SAGE_DISABLE_CUDA") == "1" or not hopper(device) or _build_failed is not None:
        return False
    try:
        load()
    except Exception as err:  # noqa: BLE001 - any build failure means: use Triton
        _build_failed = str(err)
        import warnings

        warnings.warn(f"{who}: the CUDA kernels are unavailable, backend='auto' uses Triton: {err}", stacklevel=3)
        return False
    return True


def pick_cuda(requested: str, resolved: str, device, unsupported, who: str) -> str:
    """The backend once a generation's CUDA kernel has had its say. ``resolved`` is what
    checks.resolve_backend made of ``requested``: ``"cuda"`` (asked for, and the device checked by
    :func:`check_cuda_device`) raises a clear error when ``unsupported()`` names why the kernel cannot
    run the call; ``"auto"`` that resolved to ``"triton"`` becomes ``"cuda"`` where the kernel covers
    the call and builds (:func:`usable_for_auto`). ``unsupported``: a callable, asked only then."""
    if resolved != "cuda" and not (requested == "auto" and resolved == "triton"):
        return resolved
    reason = unsupported()
    if resolved == "cuda":
        if reason is not None:
            raise ValueError(f"backend='cuda' does not support {reason}; use backend='triton'")
        return resolved
    return "cuda" if reason is None and usable_for_auto(device, who) else resolved


def check_cuda_device(device) -> None:
    """``backend="cuda"`` asked for explicitly: a clear error unless ``device`` is an sm_90 GPU and
    the kernels build (:class:`CudaBuildUnavailable` says what is missing)."""
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}; use backend='torch'")
    if not hopper(device):
        from .checks import device_capability

        major, minor = device_capability(device)
        raise ValueError(f"backend='cuda' needs a Hopper GPU (compute capability 9.0), got {major}.{minor}; "
                         "use backend='triton'")
    load()


def check(verbose: bool = True) -> int:
    """Compile every source for sm_90a and link, in a fresh directory, with no GPU. Returns the
    exit status (0: all compiled)."""
    missing = missing_tools()
    if missing:
        print("common.build --check: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sage-cuda-check-") as tmp:
        start = time.time()
        _write_ninja(Path(tmp), find_nvcc())
        try:
            _run_ninja(Path(tmp), verbose)
        except CudaBuildUnavailable as err:
            print(err, file=sys.stderr)
            return 1
        print(f"common.build --check: {len(_sources())} sources compiled for sm_90a and linked "
              f"in {time.time() - start:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compile every source for sm_90a (no GPU needed)")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    try:
        print(build(verbose=True))
    except CudaBuildUnavailable as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
