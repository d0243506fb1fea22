// cuda_emu.h: the CUDA subset used by kernels/*.cu, emulated on the CPU so the tests can run the
// real kernel source without a GPU. A logic check, not a GPU: see README.md.
//
// A block's threads are fibers (ucontext) on one OS thread: each runs until it reaches
// __syncthreads, a warp shuffle or its end, then the next one runs. Blocks run one after
// another, so a __shared__ variable can be a static (in a section of its own, refilled with
// 0xff at each block start) and races between blocks cannot show. What a GPU would punish and
// x86 would not is reported as a launch error: a __syncthreads not reached at the same place by
// every live thread, a shuffle whose lanes disagree on the mask or that reads a lane not taking
// part, a barrier or shuffle that can never complete, a misaligned float4 access.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <math.h>  // expf, fmaf, ... in the global namespace, as CUDA has them

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// threadIdx is rewritten by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Static shared variables get a section of their own, refilled with 0xff at each block start.
#define __shared__ static __attribute__((section("emu_shared")))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() emu::sync_block(__FILE__, __LINE__)

namespace emu {

enum class State { ready, at_barrier, at_shuffle, exited };

struct Fiber {
    ucontext_t ctx;
    dim3 idx;
    State state;
    const char* file;  // the barrier it waits at
    int line;
    unsigned mask;     // the shuffle it waits in: lanes named, value offered
    uint64_t offered;
};

struct Launch {
    void (*call)(void*, void**);
    void* fn;
    void** argv;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> published;  // per thread: its shuffle value, as of the last release
    std::vector<char> took_part;      // per thread: whether it was in its warp's last release
    ucontext_t scheduler;
    unsigned current;
    std::string error;
};
inline Launch L;

inline void fail(const std::string& what) {
    if (!L.error.empty()) return;
    const dim3 t = threadIdx, b = blockIdx;
    char where[96];
    std::snprintf(where, sizeof where, "block (%u,%u,%u) thread (%u,%u,%u): ", b.x, b.y, b.z, t.x, t.y, t.z);
    L.error = where + what;
}

inline void yield() { swapcontext(&L.fibers[L.current].ctx, &L.scheduler); }

inline void sync_block(const char* file, int line) {
    Fiber& f = L.fibers[L.current];
    f.state = State::at_barrier;
    f.file = file;
    f.line = line;
    yield();
}

// Lane `src` of the caller's warp, as CUDA's shuffles read it: every live lane named in `mask`
// offers its value, then all of them read.
template <class T>
T shuffle(unsigned mask, T v, int src) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
    const unsigned me = L.current, lane = me % 32;
    if (!(mask >> lane & 1u)) fail("shuffle mask does not name the calling lane");
    Fiber& f = L.fibers[me];
    f.state = State::at_shuffle;
    f.mask = mask;
    f.offered = 0;
    std::memcpy(&f.offered, &v, sizeof(T));
    yield();
    const unsigned from = me - lane + unsigned(src);
    if (!(mask >> src & 1u) || from >= L.fibers.size() || !L.took_part[from])
        fail("shuffle reads lane " + std::to_string(src) + ", which is not taking part");
    T r;
    std::memcpy(&r, &L.published[from < L.published.size() ? from : me], sizeof(T));
    return r;
}

// A 16-byte access; a GPU faults on a misaligned one, x86 would not.
inline void copy16(void* dst, const void* src) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u) {
        fail("misaligned 16-byte (float4) access");
        return;
    }
    std::memcpy(dst, src, 16);
}

// An 8-byte (float2) access; misaligned, it faults on a GPU.
template <size_t N> void copy_aligned(void* dst, const void* src) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & (N - 1)) {
        fail("misaligned " + std::to_string(N) + "-byte access");
        return;
    }
    std::memcpy(dst, src, N);
}

}  // namespace emu

struct alignas(16) float4 {
    float x, y, z, w;
    float4() = default;
    float4(const float4& o) { emu::copy16(this, &o); }
    float4& operator=(const float4& o) {
        emu::copy16(this, &o);
        return *this;
    }
};
struct alignas(8) float2 {
    float x, y;
    float2() = default;
    float2(const float2& o) { emu::copy_aligned<8>(this, &o); }
    float2& operator=(const float2& o) {
        emu::copy_aligned<8>(this, &o);
        return *this;
    }
};
inline float2 make_float2(float x, float y) {
    float2 r;
    r.x = x, r.y = y;
    return r;
}
inline float4 make_float4(float x, float y, float z, float w) {
    float4 r;
    r.x = x, r.y = y, r.z = z, r.w = w;
    return r;
}

template <class T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = emu::L.current % 32;
    return emu::shuffle(mask, v, (lane & -width) + (src & (width - 1)));
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = emu::L.current % 32, src = lane ^ lane_mask;
    return emu::shuffle(mask, v, (src & -width) == (lane & -width) ? src : lane);
}
template <class T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = emu::L.current % 32, src = lane + int(delta);
    return emu::shuffle(mask, v, (src & -width) == (lane & -width) ? src : lane);
}
template <class T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = emu::L.current % 32, src = lane - int(delta);
    return emu::shuffle(mask, v, src >= (lane & -width) ? src : lane);
}

template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
// Blocks run one after another and threads switch only at barriers and shuffles, so an atomic
// is a plain read-modify-write and a fence has nothing to order (gemm.cu's split-K tickets).
inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline void __threadfence() {}
template <class T> void __stwb(T* p, T v) { *p = v; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
// Not CUDA's exact-argument sincospi: the result can differ in the last bits.
constexpr double EMU_PI = 3.14159265358979323846;
inline void sincospi(double x, double* s, double* c) { *s = sin(EMU_PI * x); *c = cos(EMU_PI * x); }
inline void sincospif(float x, float* s, float* c) { *s = sinf(float(EMU_PI) * x); *c = cosf(float(EMU_PI) * x); }

namespace emu {

// `extern __shared__ T name[]` is rewritten (cupy/_emu.py) to point here: the launch's
// shared_mem bytes. Shared memory, static and dynamic, is refilled with 0xff (NaN as float) at
// each block start, so a read before a write, or of another block's data, shows.
inline std::vector<unsigned char> dynamic_shared_storage;
inline unsigned char* dynamic_shared = nullptr;
extern "C" unsigned char __start_emu_shared[] __attribute__((weak));  // bounds the linker gives
extern "C" unsigned char __stop_emu_shared[] __attribute__((weak));   // the section, if any

// g++ ignores the section attribute of a static declared in a template function, so such a
// __shared__ variable is not in emu_shared. cupy/_emu.py follows every __shared__ declaration in a
// function body with shared_declared(&v, sizeof v): the first thread of each block to reach it
// refills it with 0xff, and in_shared (mma_emu.h) knows it as shared memory.
inline std::map<const unsigned char*, std::pair<size_t, unsigned long long>> declared_shared;  // -> (bytes, block)
inline unsigned long long block_serial = 0;  // bumped at each block start
inline void shared_declared(void* p, size_t bytes) {
    auto& seen = declared_shared[static_cast<const unsigned char*>(p)];
    seen.first = bytes;
    if (seen.second != block_serial) {
        seen.second = block_serial;
        std::memset(p, 0xff, bytes);
    }
}

}  // namespace emu

#include "mma_emu.h"  // mma.sync, ldmatrix, cp.async: the warp-level instructions of kernels/mma.cuh

namespace emu {

struct Kernel {
    void (*call)(void*, void**);
    void* fn;
    std::string params;  // one descriptor per parameter, ' '-separated (see param_descriptor)
    int max_threads;     // __launch_bounds__: a bigger block fails to launch on a GPU
};
inline std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

// "f4" float, "i8" long long, "*f4" float*, "*v" void*, "*p8" float* const*: enough for the
// Python side to check each argument's kind and size.
template <class T> std::string value_descriptor() {
    if constexpr (std::is_pointer_v<T>) return "p8";
    else if constexpr (std::is_void_v<T>) return "v";
    else return (std::is_floating_point_v<T> ? "f" : "i") + std::to_string(sizeof(T));
}
template <class T> std::string param_descriptor() {
    if constexpr (std::is_pointer_v<T>) return "*" + value_descriptor<std::remove_cv_t<std::remove_pointer_t<T>>>();
    else return value_descriptor<T>();
}

template <class... A, size_t... I>
void invoke(void* fn, void** argv, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<std::remove_cv_t<A>*>(argv[I])...);
}
template <class... A> int register_kernel(const char* name, void (*fn)(A...), int max_threads) {
    std::string params;
    ((params += param_descriptor<std::remove_cv_t<A>>() + " "), ...);
    registry()[name] = {[](void* f, void** argv) { invoke<A...>(f, argv, std::index_sequence_for<A...>{}); },
                        reinterpret_cast<void*>(fn), params, max_threads};
    return 0;
}

inline void fiber_main() {
    L.call(L.fn, L.argv);
    L.fibers[L.current].state = State::exited;  // returning resumes the scheduler (uc_link)
}

// Fiber stacks, kept across launches; kernels hold only small register arrays.
constexpr size_t STACK_BYTES = 256 * 1024;
inline std::vector<unsigned char*> stacks;

inline unsigned char* stack_of(unsigned t) {
    while (stacks.size() <= t) {
        void* p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        mprotect(p, 4096, PROT_NONE);  // a guard page: overflowing the stack faults
        stacks.push_back(static_cast<unsigned char*>(p));
    }
    return stacks[t];
}

inline std::string describe_stall() {
    std::string s = "deadlock: no thread can continue;";
    for (unsigned t = 0; t < L.fibers.size(); ++t) {
        const Fiber& f = L.fibers[t];
        if (f.state == State::at_barrier)
            s += " thread " + std::to_string(t) + " waits at __syncthreads (" + f.file + ":" + std::to_string(f.line) + ");";
        else if (f.state == State::at_shuffle)
            s += " thread " + std::to_string(t) + " waits in a shuffle;";
        if (s.size() > 600) return s + " ...";
    }
    return s;
}

// Releases what can be released once no fiber is ready: each shuffle whose named live lanes
// all wait in it, else the whole block if every live thread waits at the same __syncthreads.
inline bool release() {
    const unsigned n = L.fibers.size();
    bool any = false;
    for (unsigned t = 0; t < n; ++t) {
        if (L.fibers[t].state != State::at_shuffle) continue;
        const unsigned w0 = t - t % 32, w1 = std::min(n, w0 + 32), mask = L.fibers[t].mask;
        bool complete = true;
        for (unsigned u = w0; u < w1; ++u) {
            const Fiber& g = L.fibers[u];
            if (!(mask >> (u - w0) & 1u) || g.state == State::exited) continue;
            if (g.state != State::at_shuffle) {
                complete = false;
            } else if (g.mask != mask) {
                threadIdx = g.idx;
                fail("lanes named in one shuffle's mask pass different masks");
                return false;
            }
        }
        if (!complete) continue;
        for (unsigned u = w0; u < w1; ++u)
            if (mask >> (u - w0) & 1u) {
                L.took_part[u] = L.fibers[u].state == State::at_shuffle;
                if (L.took_part[u]) {
                    L.published[u] = L.fibers[u].offered;
                    L.fibers[u].state = State::ready;
                }
            }
        any = true;
    }
    if (any) return true;
    const Fiber* site = nullptr;
    for (const Fiber& f : L.fibers) {
        if (f.state == State::exited) continue;
        if (f.state != State::at_barrier) return false;
        if (!site) site = &f;
        if (f.line != site->line || std::strcmp(f.file, site->file) != 0) {
            threadIdx = f.idx;
            fail(std::string("__syncthreads at ") + f.file + ":" + std::to_string(f.line) + " while thread (" +
                 std::to_string(site->idx.x) + "," + std::to_string(site->idx.y) + "," + std::to_string(site->idx.z) +
                 ") waits at " + site->file + ":" + std::to_string(site->line) + " (a divergent barrier)");
            return false;
        }
    }
    for (Fiber& f : L.fibers)
        if (f.state == State::at_barrier) f.state = State::ready;
    return site != nullptr;
}

inline void run_block(size_t shared_bytes) {
    std::fill(dynamic_shared_storage.begin(), dynamic_shared_storage.begin() + shared_bytes, 0xff);
    if (__start_emu_shared) std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
    ++block_serial;
    const unsigned n = L.fibers.size();
    warp_ops_reset(n);
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = L.fibers[t];
        f.idx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
        f.state = State::ready;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack_of(t);
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &L.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    unsigned live = n;
    // Threads run in increasing order, then decreasing after each release: a read of another
    // thread's shared write without a barrier between them then sees stale data in one order.
    for (unsigned round = 0; live > 0 && L.error.empty(); ++round) {
        for (unsigned i = 0; i < n; ++i)
            if (const unsigned t = round % 2 ? n - 1 - i : i; L.fibers[t].state == State::ready) {
                L.current = t;
                threadIdx = L.fibers[t].idx;
                swapcontext(&L.scheduler, &L.fibers[t].ctx);
            }
        live = 0;
        for (const Fiber& f : L.fibers) live += f.state != State::exited;
        if (live > 0 && !release() && L.error.empty()) fail(describe_stall());
    }
}

}  // namespace emu

// The Python side (cupy/_emu.py) calls these through ctypes; all else is hidden.
#define EMU_API extern "C" __attribute__((visibility("default")))

EMU_API const char* emu_params(const char* name) {
    auto it = emu::registry().find(name);
    return it == emu::registry().end() ? nullptr : it->second.params.c_str();
}

EMU_API int emu_max_threads(const char* name) { return emu::registry().at(name).max_threads; }

EMU_API int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, size_t shared_bytes, void** argv, char* error, size_t error_size) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    using namespace emu;
    const Kernel& k = registry().at(name);
    L.call = k.call;
    L.fn = k.fn;
    L.argv = argv;
    L.error.clear();
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned n = bx * by * bz;
    L.fibers.assign(n, Fiber{});
    L.published.assign(n, 0);
    L.took_part.assign(n, 0);
    if (!stack_of(n - 1)) L.error = "out of memory for fiber stacks";
    if (dynamic_shared_storage.size() < shared_bytes) dynamic_shared_storage.resize(shared_bytes);
    dynamic_shared = dynamic_shared_storage.data();
    // Blocks run one after another, x fastest, then y, then z; GPUML_EMU_BLOCK_ORDER=reverse runs
    // them last to first, so a kernel whose blocks cooperate (the split-K last-block reductions)
    // is also checked with another block finishing last. Read at every launch: no rebuild.
    const char* order = std::getenv("GPUML_EMU_BLOCK_ORDER");
    const bool reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
    const unsigned long long blocks = (unsigned long long)gx * gy * gz;
    for (unsigned long long i = 0; i < blocks && L.error.empty(); ++i) {
        const unsigned long long b = reverse ? blocks - 1 - i : i;
        blockIdx = {unsigned(b % gx), unsigned(b / gx % gy), unsigned(b / ((unsigned long long)gx * gy))};
        run_block(shared_bytes);
    }
    std::snprintf(error, error_size, "%s", L.error.c_str());
    return L.error.empty() ? 0 : 1;
}
