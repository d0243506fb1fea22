// augment.cu: random affine augmentation (shift, rotation, scale, optional horizontal flip) of
// a float32 NCHW image batch, bilinear, for training on the device.
//
// The contract (and the CPU reference) is gpuml/backend/augment.py: sample b draws five uniforms
// gpuml_uniform(seed, offset + 5 b + k), k = 0..4, which give the angle, scale, shift and flip;
// output pixel (y, x) samples the input at the inverse-transformed point about the image centre,
// reading `fill` outside the image. Coordinates and weights are computed in double, as on the
// CPU, so the two backends agree to float32 rounding of the result.
//
// Entry point:
//   augment_affine (x, y, N, C, H, W, seed, offset, offset_at, max_shift, max_rotate_halfturns,
//                   max_scale, hflip, fill)
//   the generator offset is offset + offset_at[0] (a device int64 counter: a replayed CUDA graph
//   draws fresh transforms each step; the host passes a zero for a plain offset)
//   one thread per output pixel position (b, oy, ox) looping over the C channels; 1-D
//   grid-stride, block 256, any grid. y must not overlap x.
// Limits: N*H*W < 2^63; images of any size.
#include "common.cuh"

extern "C" __global__ void augment_affine(const float* __restrict__ x, float* __restrict__ y, int N, int C,
                                          int H, int W, gpuml_u64 seed, gpuml_u64 offset,
                                          const gpuml_i64* __restrict__ offset_at, double max_shift,
                                          double max_rotate_halfturns, double max_scale, int hflip, float fill) {
    const gpuml_i64 plane = (gpuml_i64)H * W;
    const gpuml_i64 total = (gpuml_i64)N * plane;
    const double cy = (H - 1) * 0.5, cx = (W - 1) * 0.5;
    const gpuml_u64 first = offset + (gpuml_u64)offset_at[0];
    for (gpuml_i64 idx = (gpuml_i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (gpuml_i64)gridDim.x * blockDim.x) {
        const int b = (int)(idx / plane);
        const int oy = (int)((idx % plane) / W);
        const int ox = (int)(idx % W);
        // Every thread of sample b recomputes its five uniforms: five hashes are cheaper than a
        // second launch or a shared-memory handoff.
        const gpuml_u64 base = first + 5ull * (gpuml_u64)b;
        const double u0 = gpuml_uniform(seed, base + 0), u1 = gpuml_uniform(seed, base + 1);
        const double u2 = gpuml_uniform(seed, base + 2), u3 = gpuml_uniform(seed, base + 3);
        const double u4 = gpuml_uniform(seed, base + 4);
        // The angle in half-turns (degrees / 180): sincospi needs no slow-path argument reduction,
        // which sin/cos of radians would (a local-memory stack frame).
        const double halfturns = (2.0 * u0 - 1.0) * max_rotate_halfturns;
        const double scale = 1.0 + (2.0 * u1 - 1.0) * max_scale;
        double sa, ca;
        sincospi(halfturns, &sa, &ca);
        ca /= scale;
        sa /= scale;
        const double tx = (2.0 * u2 - 1.0) * max_shift, ty = (2.0 * u3 - 1.0) * max_shift;
        const double px = ox - cx - tx, py = oy - cy - ty;
        double qx = ca * px + sa * py;
        const double qy = -sa * px + ca * py;
        if (hflip && u4 < 0.5) qx = -qx;
        const double sx = qx + cx, sy = qy + cy;
        const double fx0 = floor(sx), fy0 = floor(sy);
        const int x0 = (int)fx0, y0 = (int)fy0;
        const double fx = sx - fx0, fy = sy - fy0;
        const bool in_x0 = x0 >= 0 && x0 < W, in_x1 = x0 + 1 >= 0 && x0 + 1 < W;
        const bool in_y0 = y0 >= 0 && y0 < H, in_y1 = y0 + 1 >= 0 && y0 + 1 < H;
        for (int c = 0; c < C; ++c) {
            const float* img = x + ((gpuml_i64)b * C + c) * plane;
            const double v00 = (in_y0 && in_x0) ? img[(gpuml_i64)y0 * W + x0] : fill;
            const double v01 = (in_y0 && in_x1) ? img[(gpuml_i64)y0 * W + x0 + 1] : fill;
            const double v10 = (in_y1 && in_x0) ? img[(gpuml_i64)(y0 + 1) * W + x0] : fill;
            const double v11 = (in_y1 && in_x1) ? img[(gpuml_i64)(y0 + 1) * W + x0 + 1] : fill;
            const double acc = (1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11);
            y[((gpuml_i64)b * C + c) * plane + (gpuml_i64)oy * W + ox] = (float)acc;
        }
    }
}
