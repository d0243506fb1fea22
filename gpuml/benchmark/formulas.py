"""Work formulas: the FLOPs and the minimum bytes each benchmarked op must move.

FLOPs count a multiply-add as 2. Minimum bytes count every input read once and every output
written once (4 bytes per float32 or int32 element), i.e. what a kernel with perfect on-chip
reuse would move to and from DRAM. A rate computed from them is a lower bound on the useful work
done, comparable across implementations: every implementation of a row is charged the same work.

- GEMM C(M,N) = op(A)(M,K) @ op(B)(K,N): 2*M*N*K FLOPs; 4*(M*K + K*N + M*N) bytes.
- conv2d, x (N,C,H,W), w (K,C,R,S), y (N,K,P,Q): each of fwd, bwd_data and bwd_weight is the
  same 2*N*K*P*Q*C*R*S FLOPs (the products a direct convolution performs; bwd_data counts the
  same products as fwd, so padded taps are included). Bytes: fwd reads x, w, bias and writes y;
  bwd_data reads dy, w and writes dx; bwd_weight reads x, dy and writes dw.
- maxpool2d fwd reads x, writes y and the int32 argmax; bwd reads dy and argmax, writes dx.
  avgpool2d fwd reads x, writes y; bwd reads dy, writes dx. (PyTorch's anchor stores int64
  indices, i.e. moves more than this minimum; it is still charged the same bytes.)
- softmax_xent (B,K): reads logits (B*K) and labels (B), writes dlogits (B*K) and the 0-d loss.
- Adam over P parameters: reads p, g, m, v and writes p, m, v: 28 bytes per parameter.
"""

from __future__ import annotations

import math

F32 = 4  # bytes per float32 / int32 element


def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def gemm_bytes(m: int, n: int, k: int) -> int:
    return F32 * (m * k + k * n + m * n)


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv_flops(n: int, c: int, h: int, w: int, k: int, r: int, s: int, stride: int = 1, pad: int = 0) -> int:
    p, q = conv_out(h, r, stride, pad), conv_out(w, s, stride, pad)
    return 2 * n * k * p * q * c * r * s


def conv_bytes(op: str, n: int, c: int, h: int, w: int, k: int, r: int, s: int,
               stride: int = 1, pad: int = 0) -> int:
    """op: conv2d_fwd (with bias), conv2d_bwd_data or conv2d_bwd_weight."""
    p, q = conv_out(h, r, stride, pad), conv_out(w, s, stride, pad)
    x, wt, y = n * c * h * w, k * c * r * s, n * k * p * q
    if op == "conv2d_fwd":
        return F32 * (x + wt + k + y)
    if op in ("conv2d_bwd_data", "conv2d_bwd_weight"):
        return F32 * (x + wt + y)
    raise ValueError(f"unknown conv op {op!r}")


def pool_bytes(op: str, n: int, c: int, h: int, w: int, kernel: int, stride: int) -> int:
    """op: maxpool2d_fwd, maxpool2d_bwd, avgpool2d_fwd or avgpool2d_bwd (no padding)."""
    p, q = conv_out(h, kernel, stride, 0), conv_out(w, kernel, stride, 0)
    x, y = n * c * h * w, n * c * p * q
    if op == "maxpool2d_fwd":
        return F32 * (x + 2 * y)  # y and argmax
    if op == "maxpool2d_bwd":
        return F32 * (2 * y + x)  # dy and argmax in, dx out
    if op in ("avgpool2d_fwd", "avgpool2d_bwd"):
        return F32 * (x + y)
    raise ValueError(f"unknown pool op {op!r}")


def softmax_xent_bytes(batch: int, classes: int) -> int:
    return F32 * (2 * batch * classes + batch + 1)


def adam_bytes(num_params: int) -> int:
    return 7 * F32 * num_params


def num_elements(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)
