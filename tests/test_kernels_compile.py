"""Every kernels/*.cu compiles with nvcc for sm_80 and sm_90 without register spills or local
memory, and common.cuh's generator matches gpuml.backend.rng bit for bit (built as host code).

Needs nvcc only (no GPU): CI runs it on GPU-less machines. ptxas reports each kernel as
    ptxas info    : Compiling entry function 'gemm_nn_tile128' for 'sm_90'
    ptxas info    : Function properties for gemm_nn_tile128
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 128 registers, used 1 barriers, 16896 bytes smem
and warns "Registers are spilled" / "Local memory used" under -warn-spills / -warn-lmem-usage.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpuml.backend import rng
from gpuml.paths import kernel_dir

pytestmark = pytest.mark.nvcc

NVCC = shutil.which("nvcc")
KERNEL_DIR = kernel_dir()
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

_ENTRY_RE = re.compile(r"Compiling entry function '(?P<name>\w+)' for '(?P<arch>\w+)'")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def ptxas_report(log: str) -> tuple[dict[str, int], list[str]]:
    """(registers per kernel, problem lines: spills, local memory, stack frames, errors)."""
    registers: dict[str, int] = {}
    problems: list[str] = []
    current = "?"
    for line in log.splitlines():
        if m := _ENTRY_RE.search(line):
            current = m["name"]
        elif m := _FRAME_RE.search(line):
            if any(int(x) for x in m.groups()):
                problems.append(f"{current}: {line.strip()}")
        elif m := _REGS_RE.search(line):
            registers[current] = int(m[1])
        elif "spill" in line.lower() or "local memory" in line.lower() or "error" in line.lower():
            problems.append(line.strip())
    return registers, problems


def test_ptxas_report_parser() -> None:
    log = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
        "ptxas info    : Function properties for k1\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers\n"
        "ptxas warning : Registers are spilled to local memory in function 'k2', 4 bytes spill stores\n"
        "ptxas info    : Compiling entry function 'k2' for 'sm_90'\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 128 registers\n"
    )
    regs, problems = ptxas_report(log)
    assert regs == {"k1": 40, "k2": 128}
    assert len(problems) == 2 and "k2" in problems[1]


def test_kernel_sources_exist() -> None:
    names = {p.name for p in SOURCES}
    assert {"gemm.cu", "softmax_xent.cu", "elementwise.cu", "optim.cu"} <= names
    assert (KERNEL_DIR / "common.cuh").is_file()


def test_common_helpers_are_used_and_keep_nan() -> None:
    """Every helper common.cuh defines is used by a kernel (or by another helper), and none
    reduces through fmaxf/fminf, which drop NaN: a diverged model must not hide in a max."""
    common = (KERNEL_DIR / "common.cuh").read_text()
    code = re.sub(r"//[^\n]*", "", common)
    kernels = "\n".join(re.sub(r"//[^\n]*", "", p.read_text()) for p in SOURCES)
    helpers = re.findall(r"__forceinline__\s+[\w\s:<>]*?\b(gpuml_\w+)\s*\(", code)
    assert {"gpuml_block_sum", "gpuml_uniform", "gpuml_uniform_bits24"} <= set(helpers), helpers
    unused = [h for h in set(helpers)
              if not re.search(rf"\b{h}\b", kernels) and len(re.findall(rf"\b{h}\b", code)) < 2]
    assert not unused, f"common.cuh helpers no kernel uses: {sorted(unused)}"
    assert not re.search(r"\bfm(ax|in)f\b", code), "common.cuh reduces with fmaxf/fminf (drops NaN)"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_without_spills(source: Path, arch: str, tmp_path: Path) -> None:
    cmd = [
        NVCC, "-cubin", "-std=c++17", f"-I{KERNEL_DIR}", f"-arch={arch}",
        "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
        "-o", str(tmp_path / "out.cubin"), str(source),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{log}"
    registers, problems = ptxas_report(log)
    assert registers, f"ptxas reported no kernels for {source.name}:\n{log}"
    assert not problems, f"{source.name} ({arch}) spills or uses local memory:\n" + "\n".join(problems)


RNG_DRIVER = r"""
#include <cstdio>
#include "common.cuh"
int main() {
    const gpuml_u64 seeds[] = {0ull, 1ull, 12345ull, 0xFFFFFFFFFFFFFFFFull, 0x9E3779B97F4A7C15ull};
    for (gpuml_u64 seed : seeds)
        for (gpuml_u64 c = 0; c < 64; ++c)
            std::printf("%u\n", gpuml_uniform_bits24(seed, c * 977ull + (c << 40)));
    return 0;
}
"""


@needs_nvcc
def test_common_uniform_matches_rng_module(tmp_path: Path) -> None:
    """gpuml_uniform_bits24 (host build of the same __host__ __device__ code) == rng.uniform."""
    src = tmp_path / "rng_driver.cu"
    src.write_text(RNG_DRIVER)
    exe = tmp_path / "rng_driver"
    proc = subprocess.run(
        [NVCC, "-std=c++17", f"-I{KERNEL_DIR}", "-o", str(exe), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.array(
        subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split(), dtype=np.float64
    )
    c = np.arange(64, dtype=np.uint64)
    counters = c * np.uint64(977) + (c << np.uint64(40))
    seeds = [0, 1, 12345, 0xFFFFFFFFFFFFFFFF, 0x9E3779B97F4A7C15]
    want = np.concatenate([rng.uniform(s, counters) * float(1 << 24) for s in seeds])
    np.testing.assert_array_equal(got, want)


#: what the tensor-core kernels must emit: (source, instruction) pairs, checked in the PTX
TENSOR_CORE_PTX = {
    "gemm_tc_tf32.cu": ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "cvt.rna.tf32.f32",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                        "cp.async.wait_group"),
    "gemm_tc_bf16.cu": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "cvt.rn.bf16x2.f32",
                        "cp.async.cg.shared.global", "cp.async.wait_group"),
    "conv2d_tf32.cu": ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "cvt.rna.tf32.f32",
                       "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                       "cp.async.ca.shared.global", "cp.async.wait_group"),
    "conv2d_bf16.cu": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "cvt.rn.bf16x2.f32",
                       "cp.async.ca.shared.global", "cp.async.wait_group"),
}


def missing_ptx(source: str, ptx: str) -> list[str]:
    """The instructions TENSOR_CORE_PTX expects of `source` that `ptx` does not contain."""
    return [i for i in TENSOR_CORE_PTX[source] if i not in ptx]


@needs_nvcc
@pytest.mark.parametrize("source", sorted(TENSOR_CORE_PTX))
def test_tensor_core_kernels_emit_mma_sync(source: str, tmp_path: Path) -> None:
    out = tmp_path / "out.ptx"
    cmd = [NVCC, "-ptx", "-std=c++17", f"-I{KERNEL_DIR}", "-arch=sm_80", "-o", str(out), str(KERNEL_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc -ptx failed on {source}:\n{proc.stdout}{proc.stderr}"
    assert not missing_ptx(source, out.read_text()), f"{source}: no {missing_ptx(source, out.read_text())} in the PTX"


@needs_nvcc
@pytest.mark.parametrize("source", ["gemm.cu", "conv2d.cu"])
def test_fp32_kernels_build_before_sm80_without_cp_async(source: str, tmp_path: Path) -> None:
    """The FP32 GEMM and conv run on the GEMM core's cp.async staging; before sm_80 (no cp.async)
    kernels/mma.cuh makes those copies synchronous, so fp32 still builds and runs there."""
    ptx = tmp_path / "out.ptx"
    cmd = [NVCC, "-ptx", "-std=c++17", f"-I{KERNEL_DIR}", "-arch=sm_75", "-o", str(ptx), str(KERNEL_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc -ptx failed on {source} for sm_75:\n{proc.stdout}{proc.stderr}"
    text = ptx.read_text()
    assert "cp.async" not in text and "trap" not in text, f"{source}: sm_75 PTX has cp.async or a trap"
