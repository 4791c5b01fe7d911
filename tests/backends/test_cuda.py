"""What only the ``cuda`` backend has: its kernel bodies compile with the machine's nvcc for sm_80
and sm_90 (nothing runs here; the op results on a GPU are checked in tests/ops/).

``requires_nvcc``: with ``SPARSEKERN_STRICT=1`` or ``CI=true`` a missing nvcc fails these tests
instead of skipping them.
"""

import subprocess

from tests.support import ROOT, nvcc_path, requires_nvcc

pytestmark = requires_nvcc

CUDA_DIR = ROOT / "csrc" / "cuda"


def test_torch_free_kernel_file_compiles_for_sm80_and_sm90(tmp_path):
    src = CUDA_DIR / "compile_check.cu"
    for arch in ("sm_80", "sm_90"):
        out = tmp_path / f"check_{arch}.o"
        cmd = [nvcc_path(), "-c", str(src), "-o", str(out), "-std=c++17", "-Werror", "all-warnings",
               "-gencode", f"arch=compute_{arch[3:]},code={arch}"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"nvcc failed for {arch}:\n{r.stdout}\n{r.stderr}"
        assert out.stat().st_size > 0


def test_torch_glue_compiles_against_installed_torch_headers(tmp_path):
    """The launchers (csrc/cuda/sparse_cuda.cu) compile against this torch's headers for sm_90.

    A CPU build of torch ships the CUDA headers but not the configure-time
    ``c10/cuda/impl/cuda_cmake_macros.h``; an empty stand-in is enough to compile (not link).
    """
    import torch.utils.cpp_extension as ce

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    incs = [f"-I{tmp_path / 'stub'}"] + [f"-I{p}" for p in ce.include_paths()]
    cmd = [nvcc_path(), "-c", str(CUDA_DIR / "sparse_cuda.cu"), "-o", str(tmp_path / "glue.o"), "-std=c++20",
           "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90", *incs]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    assert (tmp_path / "glue.o").stat().st_size > 0
