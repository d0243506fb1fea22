"""The CPU emulator of tests/cuda_emulator checks what its README claims: shuffles and dynamic
shared memory behave as on a GPU, shared memory starts each block as NaN, and the misuse a GPU
punishes (divergent barriers, shuffles reading absent lanes, misaligned float4, blocks over
__launch_bounds__, mistyped arguments, writes past an array) fails the launch. Runs only under
`--cuda-emulator`."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
if not cupy.__version__.endswith("cpu-emulator"):
    pytest.skip("checks tests/cuda_emulator itself (run with --cuda-emulator)", allow_module_level=True)

SOURCE = r"""
extern "C" __global__ void shuffles(const int* x, int* out) {
    const int v = x[threadIdx.x];
    int* o = out + 5 * threadIdx.x;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_down_sync(0xffffffffu, v, 3);
    o[2] = __shfl_up_sync(0xffffffffu, v, 2, 16);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    o[4] = __shfl_xor_sync(threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffff0000u, v, 1);  // two groups
}

extern "C" __global__ void reverse_in_shared(const float* x, float* y, float* before) {
    extern __shared__ __align__(16) float buf[];
    before[blockIdx.x * blockDim.x + threadIdx.x] = buf[threadIdx.x];  // never written yet
    buf[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// A __shared__ inside a template function (as in the GEMM mainloops): g++ ignores the section
// attribute there, so the emulator registers it where it is declared.
template <int N>
__device__ void stash_in_template_shared(const float* x, float* y, float* before) {
    __shared__ float s[N];
    const int i = blockIdx.x * N + threadIdx.x;
    before[i] = s[threadIdx.x];  // never written in this block: poison, not the previous block's value
    s[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = s[N - 1 - threadIdx.x];
}
extern "C" __global__ void template_shared(const float* x, float* y, float* before) {
    stash_in_template_shared<64>(x, y, before);
}

extern "C" __global__ void early_exit_then_barrier(float* y, int n) {
    __shared__ float s[64];
    if ((int)threadIdx.x >= n) return;  // exited threads do not hold a barrier (PTX `exit`)
    s[threadIdx.x] = 1.0f + threadIdx.x;
    __syncthreads();
    y[threadIdx.x] = s[n - 1 - threadIdx.x];
}

extern "C" __global__ void missing_barrier(const float* x, float* y) {
    __shared__ float s[64];
    const int i = blockIdx.x * 64 + threadIdx.x;
    s[threadIdx.x] = x[i];
    y[i] = s[(threadIdx.x + 1) % 64];  // no __syncthreads before the read: a race
}

extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 0.0f;
}

extern "C" __global__ void shuffle_from_exited_lane(float* y) {
    if (threadIdx.x >= 16) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
}

extern "C" __global__ void shuffle_with_mismatched_masks(float* y) {
    y[threadIdx.x] = __shfl_xor_sync(threadIdx.x % 32 == 0 ? 0xffffffffu : 0xfffffffeu, 1.0f, 2);
}

extern "C" __global__ void barrier_inside_shuffling_warp(float* y) {
    float v = 1.0f;
    if (threadIdx.x == 0) __syncthreads(); else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

extern "C" __global__ void misaligned_float4(const float* x, float* y) {
    const float4 v = *reinterpret_cast<const float4*>(x + 1);
    y[0] = v.x;
}

extern "C" __global__ void __launch_bounds__(64) at_most_64(float* y, long long n, double scale) {
    if (threadIdx.x < n) y[threadIdx.x] = (float)scale;
}

extern "C" __global__ void one_past_the_end(float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.0f;
}
"""


@pytest.fixture(scope="module")
def kernels():
    module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
    return module.get_function


def test_the_device_says_it_is_not_a_gpu() -> None:
    from gpuml.backend import get_backend

    assert cupy.cuda.runtime.getDeviceProperties(0)["name"] == b"CPU emulator (not a GPU)"
    assert "CPU emulator (not a GPU)" in get_backend("cuda").describe()


def test_shuffles_read_the_lanes_cuda_defines(kernels) -> None:
    x = np.arange(100, 164, dtype=np.int32)
    out = cupy.zeros((64, 5), dtype=np.int32)
    kernels("shuffles")((1,), (64,), (cupy.asarray(x), out))
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    want = np.stack([
        x[base + (lane ^ 5)],
        x[np.where(lane + 3 < 32, np.arange(64) + 3, np.arange(64))],
        x[np.where(lane % 16 >= 2, np.arange(64) - 2, np.arange(64))],
        x[base + 7],
        x[base + (lane ^ 1)],
    ], axis=1)  # fmt: skip
    np.testing.assert_array_equal(cupy.asnumpy(out), want)


def test_dynamic_shared_memory_is_per_launch_and_poisoned(kernels) -> None:
    x = np.arange(3 * 128, dtype=np.float32)
    y, before = cupy.zeros(x.shape), cupy.zeros(x.shape)
    kernels("reverse_in_shared")((3,), (128,), (cupy.asarray(x), y, before), shared_mem=128 * 4)
    np.testing.assert_array_equal(cupy.asnumpy(y), x.reshape(3, 128)[:, ::-1].ravel())
    assert np.isnan(cupy.asnumpy(before)).all()


def test_shared_memory_declared_in_a_template_is_poisoned_per_block(kernels) -> None:
    x = np.arange(3 * 64, dtype=np.float32)
    y, before = cupy.zeros(x.shape), cupy.zeros(x.shape)
    kernels("template_shared")((3,), (64,), (cupy.asarray(x), y, before))
    np.testing.assert_array_equal(cupy.asnumpy(y), x.reshape(3, 64)[:, ::-1].ravel())
    assert np.isnan(cupy.asnumpy(before)).all()


def test_exited_threads_do_not_hold_a_barrier(kernels) -> None:
    y = cupy.zeros(64)
    kernels("early_exit_then_barrier")((1,), (64,), (y, np.int32(40)))
    np.testing.assert_array_equal(cupy.asnumpy(y)[:40], 40.0 - np.arange(40))


def test_a_missing_barrier_reads_poison_in_every_block(kernels) -> None:
    y = cupy.zeros(128)
    kernels("missing_barrier")((2,), (64,), (cupy.asarray(np.ones(128, np.float32)), y))
    assert np.isnan(cupy.asnumpy(y).reshape(2, 64)).any(axis=1).all()


@pytest.mark.parametrize("name, message", [
    ("divergent_barrier", "divergent barrier"),
    ("shuffle_from_exited_lane", r"shuffle reads lane \d+, which is not taking part"),
    ("shuffle_with_mismatched_masks", "pass different masks"),
    ("barrier_inside_shuffling_warp", "deadlock"),
])  # fmt: skip
def test_barrier_and_shuffle_misuse_fails_the_launch(kernels, name: str, message: str) -> None:
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match=message):
        kernels(name)((1,), (64,), (cupy.zeros(64),))


def test_misaligned_float4_fails_the_launch(kernels) -> None:
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match="misaligned"):
        kernels("misaligned_float4")((1,), (1,), (cupy.zeros(8), cupy.zeros(1)))


def test_launch_bounds_and_argument_types_are_enforced(kernels) -> None:
    k, y = kernels("at_most_64"), cupy.zeros(128)
    k((1,), (64,), (y, np.int64(64), np.float64(2.0)))
    assert (cupy.asnumpy(y)[:64] == 2.0).all()
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match="limit 64 threads"):
        k((1,), (128,), (y, np.int64(128), np.float64(2.0)))
    with pytest.raises(TypeError, match="argument 1 is i8, got int32"):
        k((1,), (64,), (y, np.int32(64), np.float64(2.0)))
    with pytest.raises(TypeError, match="argument 2: pass a NumPy scalar"):
        k((1,), (64,), (y, np.int64(64), 2.0))
    with pytest.raises(TypeError, match="argument 0 points to f4, got an array of int32"):
        k((1,), (64,), (cupy.zeros(128, dtype=np.int32), np.int64(64), np.float64(2.0)))


def test_a_write_past_the_end_fails_the_launch(kernels) -> None:
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match="wrote outside argument 0's buffer"):
        kernels("one_past_the_end")((4,), (256,), (cupy.zeros(1000), np.int32(1000)))
