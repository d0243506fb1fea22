"""Host-side parts of the CUDA path, run on every machine (no GPU, no CuPy needed): kernel
include resolution and cache keys, NVRTC log parsing, launch plans, backend selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuml.backend import get_backend
from gpuml.backend.cuda import kernels as k
from gpuml.backend.cuda import launch as plan
from gpuml.backend.cuda.optim import HYPER_SIZE, hyper_vector
from gpuml.errors import DeviceError, ShapeError
from gpuml.paths import kernel_dir


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "inc").mkdir()
    (tmp_path / "common.cuh").write_text('#pragma once\n#include "inc/deep.cuh"\nint a;\n')
    (tmp_path / "inc" / "deep.cuh").write_text('#include "../common.cuh"  // cycle: visited once\nint b;\n')
    (tmp_path / "other.cuh").write_text("int c;\n")
    src = tmp_path / "fam.cu"
    src.write_text(
        '#include "common.cuh"\n#include <cuda_fp16.h>\n// #include "other.cuh"\n'
        '/* #include "other.cuh" */\n#include "missing.cuh"\n'
    )
    return src


def test_resolve_includes_is_recursive_and_skips_comments(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    found = k.resolve_includes(src, [tmp_path])
    assert [p.name for p in found] == ["common.cuh", "deep.cuh"]


def test_real_kernels_include_common() -> None:
    for name in ("softmax_xent", "elementwise", "optim"):
        found = k.resolve_includes(k.kernel_source_path(name), [kernel_dir()])
        assert [p.name for p in found] == ["common.cuh"]
    # the GEMMs reach common.cuh through the shared epilogue (and the tensor-core core), depth first
    core = ["gemm_core.cuh", "gemm_epilogue.cuh", "common.cuh", "gemm_math.cuh", "mma.cuh"]
    found = k.resolve_includes(k.kernel_source_path("gemm"), [kernel_dir()])
    assert [p.name for p in found] == [*core, "gemm_tiles.h"]
    found = k.resolve_includes(k.kernel_source_path("gemm_tc_tf32"), [kernel_dir()])
    assert [p.name for p in found] == ["gemm_tc.cuh", *core, "gemm_tiles.h"]


def test_cache_key_and_prepared_source_change_with_a_header(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    text = src.read_text()
    opts = k.compile_options(tmp_path)
    digest1 = k.headers_digest(k.resolve_includes(src, [tmp_path]))
    key1 = k.module_cache_key(text, digest1, opts, "sm_90")
    (tmp_path / "inc" / "deep.cuh").write_text("int b2;\n")
    digest2 = k.headers_digest(k.resolve_includes(src, [tmp_path]))
    assert digest2 != digest1
    assert k.module_cache_key(text, digest2, opts, "sm_90") != key1
    assert k.module_cache_key(text, digest1, opts, "sm_80") != key1
    assert k.module_cache_key(text, digest1, (*opts, "-lineinfo"), "sm_90") != key1
    # CuPy keys its disk cache by the code text: the header digest must be in it
    assert k.prepare_source(src, text, digest1) != k.prepare_source(src, text, digest2)
    prepared = k.prepare_source(src, text, digest1)
    assert prepared.splitlines()[1] == f'#line 1 "{src}"' and prepared.endswith(text)


def test_compile_options_are_explicit() -> None:
    opts = k.compile_options(Path("/x/kernels"))
    assert "-std=c++17" in opts and "-I/x/kernels" in opts
    assert not any("fast-math" in o or "fast_math" in o for o in opts)


def test_arch_strings() -> None:
    assert k.arch_from_compute_capability("90") == "sm_90"
    assert k.arch_from_compute_capability(80) == "sm_80"
    assert k.arch_from_compute_capability((8, 6)) == "sm_86"
    with pytest.raises(ValueError):
        k.arch_from_compute_capability("9.0")


NVRTC_LOG = """\
/work/main/kernels/gemm.cu(42): error: identifier "tile" is undefined
      float x = tile[0];
                ^

/work/main/kernels/common.cuh(7): warning #177-D: variable "unused" was declared but never referenced
/work/main/kernels/gemm.cu(50): error #20: expected a ";"

2 errors detected in the compilation of "/tmp/tmpabc/9f2c_2.cubin.cu".
"""


def test_parse_compile_log() -> None:
    diags = k.parse_compile_log(NVRTC_LOG)
    assert [(d.file.rsplit("/", 1)[-1], d.line, d.severity) for d in diags] == [
        ("gemm.cu", 42, "error"), ("common.cuh", 7, "warning"), ("gemm.cu", 50, "error"),
    ]  # fmt: skip
    assert diags[0].message == 'identifier "tile" is undefined'


def test_format_compile_error_is_one_paragraph() -> None:
    msg = k.format_compile_error(Path("/work/main/kernels/gemm.cu"), NVRTC_LOG)
    assert "\n" not in msg
    assert "gemm.cu" in msg and "/work/main/kernels/gemm.cu:42" in msg and "1 more error" in msg
    assert isinstance(k.KernelCompileError(msg), DeviceError)
    fallback = k.format_compile_error(Path("x.cu"), "nvrtc: error: invalid value for --gpu-architecture")
    assert "\n" not in fallback and "x.cu" in fallback


def test_kernel_family_names_are_identifiers() -> None:
    with pytest.raises(ValueError):
        k.kernel_source_path("../etc/passwd")


# ----------------------------------------------------------------------------- launch plans
def test_gemm_plan_picks_tile_and_split() -> None:
    big = plan.gemm_plan(4096, 4096, 4096, False, False)
    assert big.kernel == "gemm_nn_fp32_large" and big.grid == (32, 32, 1) and big.block == (256, 1, 1)
    assert big.splits == 1 and big.workspace_elems == 0
    scalar = plan.gemm_plan(1500, 1409, 33, True, False)
    assert scalar.kernel == "gemm_tn_fp32_large" and scalar.grid == (12, 12, 1)
    batch32 = plan.gemm_plan(32, 1024, 784, False, True)
    assert batch32.kernel == "gemm_nt_fp32_small" and batch32.block == (128, 1, 1)
    small_k = plan.gemm_tiles("F32")["small"]["BK"]
    assert batch32.splits > 1 and batch32.k_per_split % small_k == 0
    assert (batch32.splits - 1) * batch32.k_per_split < 784 <= batch32.splits * batch32.k_per_split
    assert batch32.grid == (16, 1, batch32.splits)
    assert batch32.workspace_elems == batch32.splits * 32 * 1024
    no_split = plan.gemm_plan(784, 1024, 32, True, False)
    assert no_split.splits == 1 and no_split.workspace_elems == 0 and no_split.grid[2] == 1
    empty_k = plan.gemm_plan(5, 7, 0, False, False)
    assert empty_k.splits == 1 and empty_k.grid == (1, 1, 1)
    only_col_sums = plan.gemm_plan(0, 7, 5, True, False)
    assert only_col_sums.grid == (1, 1, 1)
    with pytest.raises(ShapeError):
        plan.gemm_plan(2**31, 4, 4, False, False)
    with pytest.raises(ValueError):
        plan.gemm_plan(4, 4, 4, False, False, "fp16")


@pytest.mark.parametrize("M,N,K,tile,tiles,splits", [
    (512, 512, 512, "small", 128, 2), (768, 768, 768, "medium", 144, 2), (1024, 1024, 1024, "medium", 256, 1),
    (2048, 2048, 2048, "large", 256, 1), (4096, 4096, 4096, "large", 1024, 1)])
def test_gemm_plan_fp32_tile_table(M: int, N: int, K: int, tile: str, tiles: int, splits: int) -> None:
    """Issue 13 item 2: 512^3-1024^3 no longer run the old tile32x64 with scalar loads: 1024^3 takes
    64 x 64 tiles, 512^3 the 32 x 64 tile with 16-byte cp.async copies split 2-way along K; every
    grid has at least SPLITK_TARGET_BLOCKS blocks."""
    p = plan.gemm_plan(M, N, K, False, False)
    assert p.kernel == f"gemm_nn_fp32_{tile}" and p.tiles == p.grid[0] * p.grid[1] == tiles
    assert p.splits == splits and p.grid[2] == splits and tiles * splits >= plan.SPLITK_TARGET_BLOCKS


def test_gemm_tile_table_matches_the_kernels_contract() -> None:
    """Every F32 row fits MathFfma (warp tile 8 TM x 4 TN, TN % 4 == 0, TM % 4 == 0) and the 48 KiB of
    static shared memory; the table is what kernels/gemm_tiles.h says, largest first."""
    f32 = plan.gemm_tiles("F32")
    assert list(f32) == ["large", "medium", "small"]
    for t in f32.values():
        wm, wn = t["BM"] // t["WARPS_M"], t["BN"] // t["WARPS_N"]
        assert wm % 32 == 0 and wn % 16 == 0 and t["BK"] % 8 == 0
        bk, bm, bn = t["BK"], t["BM"], t["BN"]
        stage = max(bm * (bk + 4), bk * (bm + 4)) + max(bn * (bk + 4), bk * (bn + 4))
        assert stage * 4 * t["STAGES"] + 4 <= 48 * 1024
    areas = [t["BM"] * t["BN"] for t in f32.values()]
    assert areas == sorted(areas, reverse=True)


def test_softmax_xent_plan() -> None:
    small = plan.softmax_xent_plan(1000, 10, aligned16=True)
    assert small.kernel == "softmax_xent_fwd_bwd_warp" and small.grid == (125, 1, 1)
    big = plan.softmax_xent_plan(7, 32000, aligned16=True)
    assert big.kernel == "softmax_xent_fwd_bwd_block" and big.grid == (7, 1, 1) and big.vec4
    assert not plan.softmax_xent_plan(7, 32001, aligned16=True).vec4
    assert not plan.softmax_xent_plan(7, 32000, aligned16=False).vec4
    with pytest.raises(ShapeError):
        plan.softmax_xent_plan(0, 10, aligned16=True)


def test_reduction_grids_are_fixed_and_capped() -> None:
    assert plan.partials_grid(1) == (1, 1, 1)
    assert plan.partials_grid(10**9)[0] == plan.MAX_PARTIALS
    assert plan.count_correct_grid(33) == (5, 1, 1)  # 8 rows (warps) per block
    assert plan.grid_1d(0) == (1, 1, 1)
    assert plan.gather_grid(100000, 784) == (4, 65535, 1)


def test_hyper_vector_layout_matches_optim_cu() -> None:
    h = hyper_vector(lr=0.5, weight_decay=0.25, beta1=0.9, beta2=0.999, eps=1e-8,
                     bias_correction1=0.1, bias_correction2=0.001)
    assert h.shape == (HYPER_SIZE,) and h.dtype.name == "float32"
    src = (kernel_dir() / "optim.cu").read_text()
    for name, value in [("LR", 0.5), ("WEIGHT_DECAY", 0.25), ("BETA1", 0.9), ("BETA2", 0.999),
                        ("EPS", 1e-8), ("BIAS_CORRECTION1", 0.1), ("BIAS_CORRECTION2", 0.001)]:
        index = int(src.split(f"#define HYPER_{name} ")[1].split()[0])
        assert h[index] == pytest.approx(value, rel=1e-6), name


# ----------------------------------------------------------------------------- backend choice
def test_get_backend_cuda_without_gpu_is_one_line_device_error() -> None:
    from gpuml.backend import cuda_status

    if cuda_status()[0]:
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError) as info:
        get_backend("cuda")
    assert "\n" not in str(info.value) and "cuda" in str(info.value)


def test_get_backend_auto_without_gpu_is_cpu() -> None:
    from gpuml.backend import cuda_status

    if cuda_status()[0]:
        pytest.skip("a GPU is present")
    assert get_backend("auto").name == "cpu"


def test_cuda_backend_module_imports_without_cupy() -> None:
    """gpuml.backend.cuda must import anywhere (CuPy is only touched in CudaBackend())."""
    import gpuml.backend.cuda as cuda_module

    assert not cuda_module.CudaBackend.__abstractmethods__
