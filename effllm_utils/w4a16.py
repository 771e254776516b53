"""int4 weight x bf16 activation matmul (W4A16) as Triton kernels: an alternative to torch's tinygemm for the
decode step's linear layers (`decode.StaticDecoder(..., int4_kernel="triton")`).

Why they exist: tinygemm (`aten._weight_int4pack_mm`) reads a batch-1 decode step's small weights at ~30% of an
H100's memory bandwidth (measured on Qwen2.5-0.5B/1.5B shapes), so int4 decodes only 1.36-1.54x faster than bf16
although it reads 3.8x fewer bytes. Status, measured (H100, Qwen2.5-1.5B shape, batch 1, compiled + CUDA graph):
these kernels are correct (tests) but SLOWER than tinygemm — 538 tok/s vs tinygemm's 758 and bf16's 492 — so
tinygemm stays the default. Splitting K (below) did not change the rate (537 -> 538): the inner loop is
instruction-bound (a shift, mask, int->float convert and two FMAs per weight, plus per-word scale loads), not
starved of parallelism. What a fast W4A16 GEMV does that this one does not yet: 128-bit loads of several words per
thread, int4 -> float by the exponent "magic number" (or a lookup) instead of a convert, packed bf16x2 math, and
scales loaded once per group rather than per word.

The numbers are tinygemm's — groupwise asymmetric int4, w = (q - 8) * scale + zero — in a plain layout:

- `gemv` (M <= GEMV_MAX_M rows, i.e. decoding a few sequences): each program owns BLOCK_N output features and
  one slice of K (`splits`: enough slices to fill the GPU) and streams its packed rows in BLOCK_W-word steps
  (contiguous loads), dequantizing each nibble position in registers and accumulating w x in fp32; nothing is
  dequantized to memory. It writes fp32 partial sums per slice; the caller's sum over slices fuses, in a
  compiled step, into whatever consumes the product. Rows of x are a grid axis.
- `gemm` (more rows): the tile is dequantized to bf16 in registers and multiplied on tensor cores (`tl.dot`).

Layout (`pack`): q int32 [N, K] in 0..15 -> int32 [N, K/8], nibble j of word w holding column 8w + j; scales and
zeros [K/group, N, 2] (tinygemm's) -> [N, K/group, 2] so a program's groups are adjacent.

On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported),
which is how the tests check them against the dequantized reference; the decode path on CPU uses torch's CPU int4
kernel instead.
"""
from __future__ import annotations

import functools

import torch

GEMV_MAX_M = 8

try:
    import triton
    import triton.language as tl
    from triton import knobs as _knobs
except ImportError:  # no Triton (e.g. a CPU-only install): `available()` says so and the decoder uses tinygemm
    triton = None


def available(device: torch.device | str) -> bool:
    """Whether these kernels can run on `device`: Triton present, and a CUDA device (or the interpreter on CPU)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


def _interpreting() -> bool:
    return triton is not None and bool(_knobs.runtime.interpret)


def pack(q: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scales_and_zeros [K/group, N, 2]) -> (packed int32 [N, K/8], sz [N, K/group, 2])."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"W4A16 packing needs in_features divisible by 8, got {k}")
    q = q.to(torch.int32).reshape(n, k // 8, 8)
    words = torch.zeros(n, k // 8, dtype=torch.int32, device=q.device)
    for j in range(8):  # disjoint nibbles: OR them in (bit 31 may be set; int32 wraps as intended)
        words |= q[..., j] << (4 * j)
    return words.contiguous(), sz.permute(1, 0, 2).contiguous()


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`'s first half: int32 [N, K/8] -> q int32 [N, K] in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words[..., None] >> shifts) & 0xF).reshape(words.shape[0], -1)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, G, WPS,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)  # this program's share of K: packed words [split * WPS, (split + 1) * WPS)
        m = tl.program_id(2)
        WPG: tl.constexpr = GROUP // 8  # packed words per group
        KW = K // 8
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        end = tl.minimum(KW, (split + 1) * WPS)
        for w0 in range(split * WPS, end, BLOCK_W):
            rw = w0 + tl.arange(0, BLOCK_W)  # packed words [BLOCK_W] of this step, contiguous in each row
            ok = n_ok[:, None] & (rw < end)[None, :]
            w = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=ok, other=0)  # [BLOCK_N, BLOCK_W]
            s_off = rn[:, None] * (G * 2) + (rw // WPG)[None, :] * 2  # each word's group (L1-cached re-reads)
            s = tl.load(sz_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + s_off + 1, mask=ok, other=0.0).to(tl.float32) - 8.0 * s
            for j in tl.static_range(8):  # nibble j of each word is column 8 * word + j
                x = tl.load(x_ptr + m * K + rw * 8 + j, mask=rw < end, other=0.0).to(tl.float32)
                q = ((w >> (4 * j)) & 0xF).to(tl.float32)
                acc += (q * s + z) * x[None, :]
        tl.store(y_ptr + (split * M + m) * N + rn, tl.sum(acc, axis=1), mask=n_ok)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, G,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        WPG: tl.constexpr = GROUP // 8
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        rw = tl.arange(0, WPG)
        rk = tl.arange(0, GROUP)
        shifts = tl.arange(0, 8) * 4
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, G):  # one group per step: its scale and zero are one value per output feature
            w = tl.load(w_ptr + rn[:, None] * (K // 8) + g * WPG + rw[None, :], mask=n_ok[:, None], other=0)
            q = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & 0xF, [BLOCK_N, GROUP]).to(tl.float32)
            s = tl.load(sz_ptr + rn * (G * 2) + g * 2, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + rn * (G * 2) + g * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
            wd = ((q - 8.0) * s[:, None] + z[:, None]).to(x_ptr.dtype.element_ty)  # [BLOCK_N, GROUP]
            x = tl.load(x_ptr + rm[:, None] * K + g * GROUP + rk[None, :], mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(wd), acc)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=nw)
                     for bn in (2, 4, 8, 16) for bw in (32, 64, 128) for nw in (1, 2, 4)]
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                     for bm in (16, 64) for bn in (64, 128) for nw, ns in ((4, 3), (8, 3))]
    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "WPS"])(_gemv_kernel)

    @functools.cache
    def _gemm_tuned():
        return triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K"])(_gemm_kernel)


def splits(M: int, N: int, K: int) -> int:
    """How many slices of K the gemv splits into: enough programs (at 8 output features each) to fill an H100's
    132 SMs twice, each slice at least 128 packed words (1,024 columns) long; 1 for the gemm."""
    if M > GEMV_MAX_M:
        return 1
    want = max(1, -(-264 // -(-N // 8)))
    s = 1
    while s < want and s < 16 and K // 8 // (2 * s) >= 128:
        s *= 2
    return s


def partials(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 partial products [S, M, N] of x [M, K] (bf16/fp16) times the int4 weight (`pack`ed words [N, K/8],
    sz [N, K/group, 2]) transposed, one per slice of K (`splits`); their sum over S is the product. Left unsummed so
    a compiled step fuses the sum into whatever consumes the result (bias, activation, residual)."""
    if triton is None:
        raise RuntimeError("the W4A16 kernels need Triton (pip install triton); use the tinygemm int4 kernel instead")
    M, K = x.shape
    N, G = words.shape[0], sz.shape[1]
    if words.shape[1] * 8 != K or G * group != K or group % 8 or group & (group - 1):
        raise ValueError(f"W4A16 shapes do not agree: x {tuple(x.shape)}, words {tuple(words.shape)}, "
                         f"sz {tuple(sz.shape)}, group {group} (a power of two dividing in_features)")
    x = x.contiguous()
    S = splits(M, N, K)
    y = torch.empty(S, M, N, dtype=torch.float32, device=x.device)
    interp = _interpreting()  # the interpreter runs one fixed config (autotuning would time Python)
    if M <= GEMV_MAX_M:
        wps = -(-(K // 8) // S)
        if interp:
            _gemv_kernel[(triton.cdiv(N, 8), S, M)](x, words, sz, y, M, N, K, G, wps, GROUP=group, BLOCK_N=8,
                                                    BLOCK_W=16)
        else:
            _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S, M)](x, words, sz, y, M, N, K, G, wps,
                                                                              GROUP=group)
    elif interp:
        _gemm_kernel[(triton.cdiv(M, 16), triton.cdiv(N, 16))](x, words, sz, y, M, N, K, G, GROUP=group,
                                                               BLOCK_M=16, BLOCK_N=16)
    else:
        _gemm_tuned()[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            x, words, sz, y, M, N, K, G, GROUP=group)
    return y


@torch.library.custom_op("effllm::w4a16_partials", mutates_args=())
def w4a16_partials(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """`partials` as an opaque torch op, so a `torch.compile`d decode step calls the autotuned kernel as it is."""
    return partials(x, words, sz, group)


@w4a16_partials.register_fake
def _(x, words, sz, group):
    return x.new_empty(splits(x.shape[0], words.shape[0], x.shape[1]), x.shape[0], words.shape[0],
                       dtype=torch.float32)


def matmul(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] times the int4 weight transposed: [M, N] in x's dtype (fp32 accumulation)."""
    return torch.ops.effllm.w4a16_partials(x, words, sz, group).sum(0).to(x.dtype)
