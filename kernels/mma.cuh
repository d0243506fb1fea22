// mma.cuh: the warp-level tensor-core and async-copy instructions the GEMM core uses, as small
// device functions with inline PTX (sm_80+). Under the CPU emulator (GPUML_CUDA_EMULATOR, set by
// tests/cuda_emulator) this file defines nothing: tests/cuda_emulator/mma_emu.h supplies the same
// functions as a model written from the PTX ISA's tables, so the kernels' logic is checked against
// the documented fragment layouts, not against a copy of themselves.
//
// Fragments (PTX ISA 9.7.14.5.7 "Matrix Fragments for mma.m16n8k8" (.tf32) and 9.7.14.5.8
// "... mma.m16n8k16 with floating point type" (.bf16)); g = lane >> 2, t = lane % 4:
//   m16n8k8 .tf32   a[0..3] = A(g, t), A(g+8, t), A(g, t+4), A(g+8, t+4)   (16 x 8, row-major)
//                   b[0..1] = B(t, g), B(t+4, g)                           (8 x 8, k x n)
//   m16n8k16 .bf16  a[r] packs two bf16 (low half first): a[0] = A(g, 2t..2t+1),
//                   a[1] = A(g+8, 2t..2t+1), a[2] = A(g, 2t+8..2t+9), a[3] = A(g+8, 2t+8..2t+9)
//                   b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g)
//   accumulator     d[0..3] = D(g, 2t), D(g, 2t+1), D(g+8, 2t), D(g+8, 2t+1)   (16 x 8, f32)
// Every lane of the warp must execute each of these with the same arguments' shape (.aligned).
//
// Operand rounding: gpuml_f32_to_tf32 is cvt.rna.tf32.f32 (round to nearest, ties AWAY from
// zero: the PTX ISA's .rna); gpuml_pack_bf16x2 is cvt.rn.bf16x2.f32 (round to nearest even).
// gpuml/backend/cpu/precision.py rounds the CPU reference's operands the same way.
//
// cp.async: gpuml_cp_async_16 copies src_bytes (0..16) from global memory and zero-fills the rest
// of the 16 destination bytes (both addresses 16-byte aligned); gpuml_cp_async_4 copies 4 bytes or
// (src_bytes = 0) writes 4 zero bytes. The data is in shared memory only after the group that
// holds the copy has been waited for (gpuml_cp_async_wait<n>: all but the n most recent committed
// groups are complete) AND a __syncthreads makes other threads' copies visible. Before sm_80 (only
// the FP32 GEMM runs there) both are synchronous copies and the group calls do nothing, which
// keeps the same contract.
#pragma once

#if !defined(GPUML_CUDA_EMULATOR)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GPUML_HAS_MMA 1
#else
#define GPUML_HAS_MMA 0  // the launchers never pick a tensor-core kernel before sm_80
#endif

__device__ __forceinline__ unsigned gpuml_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ unsigned gpuml_f32_to_tf32(float x) {
#if GPUML_HAS_MMA
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    __trap();
    return 0u;
#endif
}

// Two floats as one .b32 of two bf16: lo in bits 0-15, hi in bits 16-31.
__device__ __forceinline__ unsigned gpuml_pack_bf16x2(float lo, float hi) {
#if GPUML_HAS_MMA
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0u;
#endif
}

// acc (16x8 f32 fragment) += A (16x8 tf32) * B (8x8 tf32)
__device__ __forceinline__ void gpuml_mma_m16n8k8_tf32(float* acc, const unsigned* a, const unsigned* b) {
#if GPUML_HAS_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// acc (16x8 f32 fragment) += A (16x16 bf16) * B (16x8 bf16)
__device__ __forceinline__ void gpuml_mma_m16n8k16_bf16(float* acc, const unsigned* a, const unsigned* b) {
#if GPUML_HAS_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// ldmatrix.x4 (b16): lanes 8j..8j+7 give the 16-byte rows of matrix j; lane l receives in r[j]
// the 32-bit word l % 4 of row l / 4 of matrix j (PTX ISA, "ldmatrix"). For 32-bit data an
// 8 x 4 block of floats is one such matrix: r[j] = M_j(l / 4, l % 4).
__device__ __forceinline__ void gpuml_ldmatrix_x4(unsigned* r, const void* row) {
#if GPUML_HAS_MMA
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(gpuml_smem_addr(row)));
#else
    __trap();
#endif
}

__device__ __forceinline__ void gpuml_cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if GPUML_HAS_MMA
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(gpuml_smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
#else  // before sm_80 (the FP32 GEMM only): a synchronous copy with the same zero fill
    const float* s = static_cast<const float*>(gmem);
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (src_bytes >= 4) v.x = s[0];
    if (src_bytes >= 8) v.y = s[1];
    if (src_bytes >= 12) v.z = s[2];
    if (src_bytes >= 16) v.w = s[3];
    *static_cast<float4*>(smem) = v;
#endif
}

__device__ __forceinline__ void gpuml_cp_async_4(void* smem, const void* gmem, int src_bytes) {
#if GPUML_HAS_MMA
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(gpuml_smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
#else
    *static_cast<float*>(smem) = src_bytes > 0 ? *static_cast<const float*>(gmem) : 0.0f;
#endif
}

__device__ __forceinline__ void gpuml_cp_async_commit() {
#if GPUML_HAS_MMA
    asm volatile("cp.async.commit_group;");
#endif
}

template <int N>
__device__ __forceinline__ void gpuml_cp_async_wait() {
#if GPUML_HAS_MMA
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

#endif  // !GPUML_CUDA_EMULATOR
