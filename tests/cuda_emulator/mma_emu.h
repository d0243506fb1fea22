// mma_emu.h: the emulator's model of the warp-level instructions of kernels/mma.cuh (mma.sync
// m16n8k8 .tf32 and m16n8k16 .bf16, ldmatrix .x4, cp.async with commit/wait groups and the tf32 /
// bf16 operand conversions). Included by cuda_emu.h; kernels/mma.cuh defines nothing when
// GPUML_CUDA_EMULATOR is set, so a kernel's calls land here.
//
// The fragment mapping below is written from the PTX ISA's tables, not from any kernel:
//   9.7.14.5.7 "Matrix Fragments for mma.m16n8k8" (.tf32 A, B; f32 C/D), and
//   9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type" (.bf16 A, B; f32 C/D),
// with groupID = %laneid >> 2 and threadID_in_group = %laneid % 4. tests/test_mma_fragments.py
// checks it on its own against the ISA formulas written out there a second time.
//
// Warp collectives: every lane deposits its registers (or, for ldmatrix, the row it addresses)
// in its slot, then the 32 lanes meet (a full-mask shuffle: a lane that exited or never arrives
// fails the launch, as .aligned demands); each lane then computes its own result from all slots.
// Slots alternate by call parity, so a lane that runs ahead into the next collective cannot
// overwrite what a slower lane still has to read.
//
// Arithmetic: the products and their sum are formed in double and rounded once to float (the
// hardware's internal order and rounding are not specified; tests bound the difference). The
// tf32 mma reads only the top 19 bits of each operand register, as the hardware does: an operand
// that was not converted with cvt.rna is truncated.
#pragma once

namespace emu {

enum WarpOp : unsigned { OP_MMA_TF32 = 0x6d6d01, OP_MMA_BF16 = 0x6d6d02, OP_LDMATRIX_X4 = 0x6c6404 };

struct WarpSlot {
    uint32_t w[10];
};
inline std::vector<WarpSlot> warp_slots;  // [thread * 2 + parity]
inline std::vector<unsigned> warp_calls;  // per thread: collectives entered so far

struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
};
inline std::vector<std::vector<AsyncCopy>> async_open;                  // per thread: not committed
inline std::vector<std::vector<std::vector<AsyncCopy>>> async_groups;   // per thread: committed, oldest first

inline void warp_ops_reset(unsigned threads) {
    warp_slots.assign(2 * threads, WarpSlot{});
    warp_calls.assign(threads, 0);
    async_open.assign(threads, {});
    async_groups.assign(threads, {});
}

inline bool in_shared(const void* p, size_t bytes) {
    const auto* c = static_cast<const unsigned char*>(p);
    const unsigned char* d = dynamic_shared_storage.data();
    if (c >= d && c + bytes <= d + dynamic_shared_storage.size()) return true;
    if (__start_emu_shared && c >= __start_emu_shared && c + bytes <= __stop_emu_shared) return true;
    auto it = declared_shared.upper_bound(c);  // the declared variable starting at or before c
    return it != declared_shared.begin() && c + bytes <= (--it)->first + it->second.first;
}

// Deposits n words, meets the other 31 lanes; returns the slot parity to read.
inline unsigned warp_collective(unsigned op, const uint32_t* words, int n, const char* what) {
    const unsigned me = L.current, lane = me % 32, w0 = me - lane;
    const unsigned parity = warp_calls[me]++ & 1u;
    std::memcpy(warp_slots[2 * me + parity].w, words, 4 * n);
    shuffle(0xffffffffu, op, int(lane));
    for (unsigned u = w0; u < w0 + 32; ++u) {
        if (u >= L.fibers.size() || !L.took_part[u]) {
            fail(std::string(what) + ": lane " + std::to_string(u - w0) + " of the warp is not taking part");
            break;
        }
        if (uint32_t(L.published[u]) != op) {
            fail(std::string(what) + ": lane " + std::to_string(u - w0) + " executes another warp instruction");
            break;
        }
    }
    return parity;
}

inline const uint32_t* slot(unsigned lane_thread, unsigned parity) { return warp_slots[2 * lane_thread + parity].w; }

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

}  // namespace emu

// cvt.rna.tf32.f32: to 10 mantissa bits, round to nearest, ties away from zero; the low 13 bits
// of the result are 0. Adding half an ulp to the magnitude and truncating is exactly that (Inf
// stays Inf, a NaN stays a NaN, a finite value past the top rounds to Inf).
inline unsigned gpuml_f32_to_tf32(float x) {
    const uint32_t u = emu::float_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x7fffffu) ? 0x7fffe000u : u;  // NaN: a quiet NaN
    return (u + 0x1000u) & 0xffffe000u;
}

// cvt.rn.bf16x2.f32: round to nearest even; NaN stays NaN (quiet).
inline uint32_t emu_bf16_rn(float x) {
    const uint32_t u = emu::float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
inline unsigned gpuml_pack_bf16x2(float lo, float hi) { return emu_bf16_rn(lo) | (emu_bf16_rn(hi) << 16); }

inline void gpuml_mma_m16n8k8_tf32(float* acc, const unsigned* a, const unsigned* b) {
    using namespace emu;
    const uint32_t mine[10] = {a[0], a[1], a[2], a[3], b[0], b[1], float_bits(acc[0]), float_bits(acc[1]),
                               float_bits(acc[2]), float_bits(acc[3])};
    const unsigned parity = warp_collective(OP_MMA_TF32, mine, 10, "mma.sync.m16n8k8.tf32");
    const unsigned w0 = L.current - L.current % 32;
    double A[16][8], B[8][8], C[16][8];
    auto tf32 = [](uint32_t r) { return double(bits_float(r & 0xffffe000u)); };
    for (unsigned lane = 0; lane < 32; ++lane) {
        const uint32_t* s = slot(w0 + lane, parity);
        const unsigned g = lane >> 2, t = lane % 4;
        A[g][t] = tf32(s[0]);          // a0: row groupID,     col threadID_in_group
        A[g + 8][t] = tf32(s[1]);      // a1: row groupID + 8, col threadID_in_group
        A[g][t + 4] = tf32(s[2]);      // a2: row groupID,     col threadID_in_group + 4
        A[g + 8][t + 4] = tf32(s[3]);  // a3: row groupID + 8, col threadID_in_group + 4
        B[t][g] = tf32(s[4]);          // b0: row threadID_in_group,     col groupID
        B[t + 4][g] = tf32(s[5]);      // b1: row threadID_in_group + 4, col groupID
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = bits_float(s[6 + i]);
    }
    const unsigned lane = L.current % 32, g = lane >> 2, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {  // c_i / d_i: row groupID (+8 for i >= 2), col 2 tig + (i & 1)
        const unsigned r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
        double s = C[r][c];
        for (int k = 0; k < 8; ++k) s += A[r][k] * B[k][c];
        acc[i] = float(s);
    }
}

inline void gpuml_mma_m16n8k16_bf16(float* acc, const unsigned* a, const unsigned* b) {
    using namespace emu;
    const uint32_t mine[10] = {a[0], a[1], a[2], a[3], b[0], b[1], float_bits(acc[0]), float_bits(acc[1]),
                               float_bits(acc[2]), float_bits(acc[3])};
    const unsigned parity = warp_collective(OP_MMA_BF16, mine, 10, "mma.sync.m16n8k16.bf16");
    const unsigned w0 = L.current - L.current % 32;
    double A[16][16], B[16][8], C[16][8];
    // element e of a .b32 register holding two bf16: e = 0 the low half, e = 1 the high half
    auto half = [](uint32_t r, int e) { return double(bits_float((e ? r >> 16 : r & 0xffffu) << 16)); };
    for (unsigned lane = 0; lane < 32; ++lane) {
        const uint32_t* s = slot(w0 + lane, parity);
        const unsigned g = lane >> 2, t = lane % 4;
        for (int i = 0; i < 8; ++i) {  // a_i in register i / 2; row groupID for i in {0,1,4,5}, else +8;
            const unsigned row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
            const unsigned col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);  // col 2 tig + (i & 1) (+8 for i >= 4)
            A[row][col] = half(s[i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i)  // b_i in register 4 + i / 2: row 2 tig + (i & 1) (+8 for i >= 2), col groupID
            B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = half(s[4 + i / 2], i & 1);
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = bits_float(s[6 + i]);
    }
    const unsigned lane = L.current % 32, g = lane >> 2, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
        double s = C[r][c];
        for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
        acc[i] = float(s);
    }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8j + i addresses row i of matrix j; lane l gets
// in r[j] the 32-bit word l % 4 of row l / 4 of matrix j. The rows are read when the lane issues
// the instruction (before the meeting), as one warp-wide read.
inline void gpuml_ldmatrix_x4(unsigned* r, const void* row) {
    using namespace emu;
    uint32_t mine[4] = {0, 0, 0, 0};
    if (reinterpret_cast<uintptr_t>(row) & 15u) fail("ldmatrix: a row address that is not 16-byte aligned");
    else if (!in_shared(row, 16)) fail("ldmatrix: a row address outside shared memory");
    else std::memcpy(mine, row, 16);
    const unsigned parity = warp_collective(OP_LDMATRIX_X4, mine, 4, "ldmatrix.x4");
    const unsigned w0 = L.current - L.current % 32, lane = L.current % 32;
    for (unsigned j = 0; j < 4; ++j) r[j] = slot(w0 + 8 * j + lane / 4, parity)[lane % 4];
}

// cp.async: recorded at issue, performed when its group is waited for (the latest moment a GPU
// may complete it), so a read of the destination before the wait sees the old bytes.
inline void emu_cp_async(void* smem, const void* gmem, int bytes, int src_bytes) {
    using namespace emu;
    if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) & uintptr_t(bytes - 1))
        return fail("cp.async: an address not aligned to the copy size (" + std::to_string(bytes) + " bytes)");
    if (!in_shared(smem, bytes)) return fail("cp.async: a destination outside shared memory");
    if (src_bytes < 0 || src_bytes > bytes) return fail("cp.async: src-size outside 0.." + std::to_string(bytes));
    async_open[L.current].push_back({smem, gmem, bytes, src_bytes});
}
inline void gpuml_cp_async_16(void* smem, const void* gmem, int src_bytes) { emu_cp_async(smem, gmem, 16, src_bytes); }
inline void gpuml_cp_async_4(void* smem, const void* gmem, int src_bytes) { emu_cp_async(smem, gmem, 4, src_bytes); }

inline void gpuml_cp_async_commit() {
    using namespace emu;
    async_groups[L.current].push_back(std::move(async_open[L.current]));
    async_open[L.current].clear();
}

template <int N>
inline void gpuml_cp_async_wait() {
    using namespace emu;
    auto& groups = async_groups[L.current];
    while (groups.size() > size_t(N)) {
        for (const AsyncCopy& c : groups.front()) {
            std::memcpy(c.dst, c.src, c.src_bytes);
            std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
        }
        groups.erase(groups.begin());
    }
}
