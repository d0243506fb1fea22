"""Random affine augmentation of an image batch: the contract shared by every backend, and the
CPU implementation (numba).

For sample b of a call with (seed, offset), five uniforms u_k = uniform(seed, offset + 5 b + k)
(the counter-based generator of gpuml.backend.rng, so the CUDA kernel draws the same numbers)
give
    angle = (2 u0 - 1) * max_rotate degrees      scale = 1 + (2 u1 - 1) * max_scale
    tx    = (2 u2 - 1) * max_shift pixels        ty    = (2 u3 - 1) * max_shift pixels
    flip  = hflip and u4 < 0.5
Output pixel (y, x) of every channel samples the input bilinearly at the point that the inverse
transform maps it to, about the image centre c = ((H-1)/2, (W-1)/2):
    p = (x - cx - tx, y - cy - ty);  q = R(-angle) p / scale;  if flip: q.x = -q.x
    source = q + c;  outside the image reads `fill` (the normalised value of a black pixel).
Labels are unchanged; a batch with every max at 0 and hflip off is copied unchanged.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from gpuml.backend.rng import uniform

UNIFORMS_PER_SAMPLE = 5


def sample_params(seed: int, offset: int, batch: int, max_shift: float, max_rotate: float,
                  max_scale: float, hflip: bool) -> np.ndarray:
    """(batch, 6) float64 rows: cos/scale, sin/scale, tx, ty, flip (0/1), unused — the inverse
    transform's coefficients per sample."""
    u = uniform(seed, np.arange(offset, offset + UNIFORMS_PER_SAMPLE * batch, dtype=np.uint64))
    u = u.reshape(batch, UNIFORMS_PER_SAMPLE)
    halfturns = (2 * u[:, 0] - 1) * (max_rotate / 180.0)  # the CUDA kernel uses sincospi of this
    scale = 1.0 + (2 * u[:, 1] - 1) * max_scale
    out = np.zeros((batch, 6))
    out[:, 0] = np.cos(np.pi * halfturns) / scale
    out[:, 1] = np.sin(np.pi * halfturns) / scale
    out[:, 2] = (2 * u[:, 2] - 1) * max_shift
    out[:, 3] = (2 * u[:, 3] - 1) * max_shift
    out[:, 4] = (u[:, 4] < 0.5) if hflip else 0.0
    return out


# Serial on purpose: numba's parallel pool busy-waits between loops and takes the cores the
# BLAS GEMMs of the same training step need (see cpu/loops.run_parts for how the CPU backend
# spreads large loops instead).
@numba.njit(cache=True)
def affine_sample(x: np.ndarray, params: np.ndarray, fill: float, out: np.ndarray) -> None:
    n, c, h, w = x.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    for b in range(n):
        ca, sa, tx, ty, flip = params[b, 0], params[b, 1], params[b, 2], params[b, 3], params[b, 4]
        for oy in range(h):
            for ox in range(w):
                px = ox - cx - tx
                py = oy - cy - ty
                qx = ca * px + sa * py
                qy = -sa * px + ca * py
                if flip > 0.5:
                    qx = -qx
                sx = qx + cx
                sy = qy + cy
                x0 = math.floor(sx)
                y0 = math.floor(sy)
                fx = sx - x0
                fy = sy - y0
                for ch in range(c):
                    acc = 0.0
                    for dy in range(2):
                        yy = y0 + dy
                        wy = fy if dy == 1 else 1.0 - fy
                        for dx in range(2):
                            xx = x0 + dx
                            wx = fx if dx == 1 else 1.0 - fx
                            if 0 <= yy < h and 0 <= xx < w:
                                v = x[b, ch, yy, xx]
                            else:
                                v = fill
                            acc += wy * wx * v
                    out[b, ch, oy, ox] = acc
