"""Build of sparsekern: the pure-Python package plus the C++ CPU kernels (``sparsekern._C``).

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already installed (torch is deliberately not a build requirement; a build never pulls a second
one).  Switches, read from the environment:

  SPARSEKERN_CPP=0      skip the C++ extension; install the pure-Python package only
                        (the ``cpp`` backend then reports itself unavailable and the reference runs).
  SPARSEKERN_NATIVE=1   add -march=native (fastest on the build machine, not portable).  Off by
                        default: the kernels are compiled for AVX-512, AVX2+FMA and baseline x86-64
                        in one library and pick at run time (see csrc/cpu/kernels.cpp).
  SPARSEKERN_CUDA=1     also compile the CUDA kernels (csrc/cuda/sparse_cuda.cu) into sparsekern._C;
                        needs a CUDA build of torch and nvcc.  Off by default.
  SPARSEKERN_DEBUG=1    -O0 -g instead of -O3.
  SPARSEKERN_STRICT=1   (CI=true implies it; SPARSEKERN_REQUIRE_BUILD=1 is its old name) make a
                        failed compile, or a C++ build skipped for want of torch or a compiler,
                        fail the install (default: fall back to the pure-Python package with a
                        message).  The test suite reads the same switch (tests/support.py).
  MAX_JOBS=N            parallel compile jobs (torch's BuildExtension honours it).

When torch or a C++ compiler is missing the extension is skipped with one message and the
pure-Python package is installed (under SPARSEKERN_STRICT the install fails instead).  A compile
that fails prints a banner, installs the pure-Python package, and tags a wheel being built as pure
(``py3-none-any``): a platform-tagged wheel always holds the extension.  Every other decision is
printed as one ``[sparsekern]`` line.  The extension records the torch it was built against
(``torch.ops.sparsekern.built_with_torch()``) and is not used under another one.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[sparsekern] {msg}", file=sys.stderr)


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _strict() -> bool:
    return (
        _flag("SPARSEKERN_STRICT", "0")
        or _flag("SPARSEKERN_REQUIRE_BUILD", "0")
        or os.environ.get("CI", "").strip().lower() == "true"
    )


def _skip_build(msg: str):
    """No C++ kernels: a message, or under SPARSEKERN_STRICT a failed install."""
    if _strict():
        raise SystemExit(f"[sparsekern] {msg}; SPARSEKERN_STRICT=1 (or CI=true) requires the C++ kernels")
    _say(msg)
    return [], {}


def _failed_build(dist, exc: Exception) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\n[sparsekern] BUILDING THE C++ KERNELS FAILED: {exc}\n"
        "[sparsekern] installing the pure-Python package only: the 'cpp' backend is unavailable and\n"
        "[sparsekern] CPU calls run on the (dense, slow) reference backend.  Fix the build (the compiler\n"
        "[sparsekern] output is above), or set SPARSEKERN_CPP=0 to skip it on purpose; SPARSEKERN_STRICT=1\n"
        f"[sparsekern] makes this failure fatal.\n{bar}\n",
        file=sys.stderr,
    )
    dist.ext_modules = []
    wheel = dist.command_obj.get("bdist_wheel")
    if wheel is not None:  # tagged when finalized, before the build: retag as pure
        wheel.root_is_pure = True
        wheel.plat_name_supplied = False


class _BuildPy(build_py):
    """build_py that also ships configs/*.yaml as sparsekern_cl/configs/ (package data), so the
    README's ``--config configs/NAME.yaml`` resolves from an installed package."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "configs")
        if self.editable_mode or not os.path.isdir(src):
            return  # an editable install reads configs/ from the source tree
        dst = os.path.join(self.build_lib, "sparsekern_cl", "configs")
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if name.endswith((".yaml", ".yml", ".json")):
                self.copy_file(os.path.join(src, name), os.path.join(dst, name))


def _extensions():
    if not _flag("SPARSEKERN_CPP", "1"):
        _say("SPARSEKERN_CPP=0: skipping the C++ kernels; installing the pure-Python package")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in the build environment (e.g. build isolation)
        return _skip_build(
            f"torch is not importable ({exc}); skipping the C++ kernels. "
            "Install torch first and use `pip install --no-build-isolation` to build them."
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return _skip_build(
            f"no C++ compiler found ({cxx!r} / g++); skipping the C++ kernels, the reference backend will run"
        )
    _say(f"building the C++ CPU kernels against torch {torch.__version__}")
    debug = _flag("SPARSEKERN_DEBUG", "0")
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    _say("SPARSEKERN_DEBUG=1: -O0 -g" if debug else "optimisation: -O3")
    # FMA contraction is off in ISO C++ modes by default; the kernels want it.
    cflags += ["-std=c++20", "-ffp-contract=fast", "-Wno-psabi", "-fvisibility=hidden"]
    # recorded in the library (built_with_torch); loading it under another torch is refused
    cflags.append(f"-DSPARSEKERN_TORCH_VERSION={torch.__version__}")
    # at::parallel_for is a header template over `#pragma omp parallel`: without -fopenmp it
    # compiles to a serial loop.  The OpenMP runtime this links (soname libgomp.so.1) resolves to
    # the one torch has already loaded, so torch.set_num_threads governs the kernels too.
    ldflags = []
    if sys.platform.startswith("linux") and torch.__config__.parallel_info().find("OpenMP") >= 0:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
        _say("threads: OpenMP (at::parallel_for, as torch is built)")
    else:
        _say("threads: torch is not built with OpenMP here; the kernels run at::parallel_for's fallback")
    if _flag("SPARSEKERN_NATIVE", "0"):
        cflags.append("-march=native")
        _say("SPARSEKERN_NATIVE=1: adding -march=native")
    else:
        _say(
            "portable build: run-time dispatch between AVX-512 / AVX2 / baseline (SPARSEKERN_NATIVE=1 for -march=native)"
        )
    # the longest compiles first (ninja starts them in about this order)
    sources = [
        "csrc/cpu/kernels.cpp",
        "csrc/cpu/bf16_dot.cpp",
        "csrc/cpu/conv2d.cpp",
        "csrc/cpu/linear.cpp",
        "csrc/cpu/dwconv2d.cpp",
        "csrc/schemas.cpp",
        "csrc/module.cpp",
        "csrc/cpu/build_meta.cpp",
    ]
    ext_cls, extra = CppExtension, {"cxx": cflags}
    sources.append("csrc/cpu/optim.cpp")  # the fused steps of sparsekern.optim
    if _flag("SPARSEKERN_CUDA", "0"):
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

        if torch.version.cuda is None or CUDA_HOME is None:
            _say("SPARSEKERN_CUDA=1 but torch has no CUDA or nvcc is missing; building the CPU kernels only")
        else:
            _say(f"SPARSEKERN_CUDA=1: adding the CUDA kernels (CUDA {torch.version.cuda}, {CUDA_HOME})")
            sources.append("csrc/cuda/sparse_cuda.cu")
            ext_cls, extra = CUDAExtension, {"cxx": cflags, "nvcc": ["-O3", "-std=c++17"]}
    else:
        _say("CUDA kernels not requested (SPARSEKERN_CUDA=1 to add them)")
    ext = ext_cls(
        "sparsekern._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=ldflags,
    )

    class _Build(BuildExtension):
        """BuildExtension that falls back to the pure-Python package if compiling fails: loudly,
        and with the wheel (if one is being built) tagged pure (py3-none-any), so no
        platform-tagged wheel ever lacks the extension."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if _strict():
                    raise
                _failed_build(self.distribution, exc)

    return [ext], {"build_ext": _Build.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": _BuildPy, **cmdclass})
