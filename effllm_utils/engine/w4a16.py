"""int4 weight x bf16 activation matmul (W4A16) as Triton kernels: an alternative to torch's tinygemm for the
decode step's linear layers (`decode.StaticDecoder(..., int4_kernel="triton")`).

Why they exist: tinygemm (`aten._weight_int4pack_mm`) reads a batch-1 decode step's small weights at ~30% of an
H100's memory bandwidth (measured on Qwen2.5-0.5B/1.5B shapes), so int4 decodes only 1.36-1.54x faster than bf16
although it reads 3.8x fewer bytes.

Measured history (H100, Qwen2.5-1.5B shape, batch 1, compiled + CUDA graph; bf16 492 tok/s, tinygemm 758):
a first GEMV (per-group 3-D unpacking, word-per-column layout) 385 tok/s; a second (a [rows, words] tile per step,
nibble by nibble, scales gathered per word, x read with a stride of 8) 537, and 538 with K split over more
programs — instruction/load bound, not short of parallelism. Both slower than tinygemm, which stays the default.
The kernels below are a third version, measured at 520 and, in a later session's run, 690 tok/s (1.5B; tinygemm
756-757 in the same runs) and 1,121 (0.5B; tinygemm 1,218): still slower than tinygemm. What it does:

- layout (`pack`): within each group of `group` columns (W = group/8 int32 words), nibble j of word w holds column
  j*W + w, so the x values for nibble j of a group's words are W contiguous elements (the second version read x
  with a stride of 8), and a step covers whole groups: scale and zero are loaded once per (row, group), and the
  group's sum is s * sum q x + (z - 8 s) * sum x, four operations per weight (shift, mask, convert, FMA);
- `gemv` (<= GEMV_MAX_M rows): each program owns BLOCK_N output features and one slice of K (`splits`: enough
  slices to fill the GPU), fp32 partial sums per slice, whose sum fuses in a compiled step into whatever consumes
  the product; rows of x are a grid axis;
- `gemm`: the tile is dequantized to bf16 in registers and multiplied on tensor cores (`tl.dot`), for more than
  one row (the gemv would re-read the weight per row), and for one row too when it times faster: on the first call
  of a shape both (each autotuned) are timed and the faster kept (`choose`, `_CHOICE`) — tinygemm itself runs
  batch-1 decoding on tensor cores.

On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported),
which is how the tests check them against the dequantized reference; the decode path on CPU uses torch's CPU int4
kernel instead.
"""
from __future__ import annotations

import torch

from effllm_utils.engine.gemv import available, slices  # noqa: F401  (available: this module's API)
from effllm_utils.engine.gemv import interpreting as _interpreting

GEMV_MAX_M = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. a CPU-only install): `available()` says so and the decoder uses tinygemm
    triton = None


def pack(q: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scales_and_zeros [K/group, N, 2]) -> (words int32 [N, K/8], sz [N, K/group, 2]).

    Within each group of `group` columns (W = group/8 words), nibble j of word w holds column j*W + w: the columns a
    kernel needs for nibble j of a run of words are then contiguous in x."""
    n, k = q.shape
    group = k // sz.shape[0] if sz.shape[0] else 0
    if k % 8 or not group or group * sz.shape[0] != k or group % 8:
        raise ValueError(f"W4A16 packing needs in_features divisible by 8 and by a group size that is a multiple of "
                         f"8; got in_features {k} with {sz.shape[0]} groups")
    q = q.to(torch.int32).reshape(n, k // group, 8, group // 8).transpose(2, 3)  # [N, G, word, nibble]
    words = torch.zeros(n, k // group, group // 8, dtype=torch.int32, device=q.device)
    for j in range(8):  # disjoint nibbles: OR them in (bit 31 may be set; int32 wraps as intended)
        words |= q[..., j] << (4 * j)
    return words.reshape(n, k // 8).contiguous(), sz.permute(1, 0, 2).contiguous()


def unpack(words: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `pack`'s first half: int32 [N, K/8] -> q int32 [N, K] in 0..15."""
    n, kw = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    q = (words.reshape(n, kw * 8 // group, group // 8)[..., None] >> shifts) & 0xF  # [N, G, word, nibble]
    return q.transpose(2, 3).reshape(n, kw * 8)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, G, GPS,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GPB: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)  # this program's share of K: groups [split * GPS, (split + 1) * GPS)
        m = tl.program_id(2)
        W: tl.constexpr = GROUP // 8  # packed words per group
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rg = tl.arange(0, GPB)
        rw = tl.arange(0, W)
        acc = tl.zeros([BLOCK_N, GPB], dtype=tl.float32)
        g_end = tl.minimum(G, (split + 1) * GPS)
        for g0 in range(split * GPS, g_end, GPB):
            g = g0 + rg  # [GPB] whole groups per step: one scale and zero per (row, group)
            g_ok = g < g_end
            w = tl.load(w_ptr + rn[:, None, None] * (K // 8) + g[None, :, None] * W + rw[None, None, :],
                        mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)  # [BLOCK_N, GPB, W]
            qx = tl.zeros([BLOCK_N, GPB, W], dtype=tl.float32)
            xs = tl.zeros([GPB, W], dtype=tl.float32)
            for j in tl.static_range(8):  # nibble j of the group's words: columns j*W .. j*W + W-1, contiguous
                x = tl.load(x_ptr + m * K + g[:, None] * GROUP + j * W + rw[None, :], mask=g_ok[:, None],
                            other=0.0).to(tl.float32)
                qx += ((w >> (4 * j)) & 0xF).to(tl.float32) * x[None, :, :]
                xs += x
            s_off = rn[:, None] * (G * 2) + g[None, :] * 2
            s_ok = n_ok[:, None] & g_ok[None, :]
            s = tl.load(sz_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + s_off + 1, mask=s_ok, other=0.0).to(tl.float32)
            # sum over a group of ((q - 8) s + z) x = s * sum q x + (z - 8 s) * sum x
            acc += s * tl.sum(qx, axis=2) + (z - 8.0 * s) * tl.sum(xs, axis=1)[None, :]
        tl.store(y_ptr + (split * M + m) * N + rn, tl.sum(acc, axis=1), mask=n_ok)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, G,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        W: tl.constexpr = GROUP // 8
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        rw = tl.arange(0, W)
        ri = tl.arange(0, GROUP)
        col = (ri % 8) * W + ri // 8  # unpacked position i = word * 8 + nibble holds column nibble * W + word
        shifts = tl.arange(0, 8) * 4
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, G):  # one group per step: its scale and zero are one value per output feature
            w = tl.load(w_ptr + rn[:, None] * (K // 8) + g * W + rw[None, :], mask=n_ok[:, None], other=0)
            q = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & 0xF, [BLOCK_N, GROUP]).to(tl.float32)
            s = tl.load(sz_ptr + rn * (G * 2) + g * 2, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + rn * (G * 2) + g * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
            wd = ((q - 8.0) * s[:, None] + z[:, None]).to(x_ptr.dtype.element_ty)  # [BLOCK_N, GROUP]
            x = tl.load(x_ptr + rm[:, None] * K + g * GROUP + col[None, :], mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(wd), acc)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "GPB": gpb}, num_warps=nw)
                     for bn in (2, 4, 8, 16) for gpb in (1, 2, 4) for nw in (1, 2, 4)]
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                     for bm in (16, 64) for bn in (32, 64, 128) for nw, ns in ((4, 3), (8, 3))]
    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "GPS"])(_gemv_kernel)
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K"])(_gemm_kernel)

# few-row (decode) products: which kernel measured faster per (N, K, group), the gemv or the tensor-core gemm at
# BLOCK_M 16 (15 of 16 rows wasted, as tinygemm does); decided by timing both on the first call of a shape (`choose`)
_CHOICE: dict[tuple[int, int, int], str] = {}
KERNELS = ("gemv", "gemm")


def splits(kernel: str, N: int, K: int, group: int) -> int:
    """How many slices of K `kernel` splits into: for the gemv `gemv.slices` (programs counted at 8 output features,
    slices of at least 8 groups); 1 for the gemm. Shape arithmetic only, so a compiled step's fake tensors (whose N
    may be symbolic) get the same answer as the kernel."""
    return 1 if kernel == "gemm" else slices(-(-N // 8), K // group, 8)


def _launch(kernel: str, x, words, sz, y, group: int) -> None:
    M, K = x.shape
    N, G = words.shape[0], sz.shape[1]
    interp = _interpreting()  # the interpreter runs one fixed config (autotuning would time Python)
    if kernel == "gemv":
        S = y.shape[0]
        gps = -(-G // S)
        if interp:
            _gemv_kernel[(triton.cdiv(N, 8), S, M)](x, words, sz, y, M, N, K, G, gps, GROUP=group, BLOCK_N=8, GPB=2)
        else:
            _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S, M)](x, words, sz, y, M, N, K, G, gps,
                                                                              GROUP=group)
    elif interp:
        _gemm_kernel[(triton.cdiv(M, 16), triton.cdiv(N, 16))](x, words, sz, y, M, N, K, G, GROUP=group,
                                                               BLOCK_M=16, BLOCK_N=16)
    else:
        _gemm_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            x, words, sz, y, M, N, K, G, GROUP=group)


def choose(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int) -> str:
    """The kernel for x's rows against this weight: for one row the faster of the gemv and the gemm, each autotuned
    and then timed on the shape's first call (eager, real tensors: before compiling or capturing a step) and
    remembered per (N, K, group); for more rows the gemm (the gemv's rows are a grid axis, each re-reading the
    weight); "gemv" under the interpreter for <= GEMV_MAX_M rows (nothing to time; it has no bf16 dot)."""
    M, K = x.shape
    N = words.shape[0]
    if M > GEMV_MAX_M:
        return "gemm"
    key = (N, K, group)
    if _interpreting():
        return "gemv"
    if M > 1:
        return "gemm"
    if key in _CHOICE:
        return _CHOICE[key]
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        raise RuntimeError("W4A16: no kernel chosen for this shape yet; call w4a16.choose on it eagerly before "
                           "compiling or capturing (decode.Linear does so when it is built)")
    from triton.testing import do_bench

    x = x.contiguous()
    ys = torch.empty(splits("gemv", N, K, group), M, N, dtype=torch.float32, device=x.device)
    y1 = torch.empty(1, M, N, dtype=torch.float32, device=x.device)
    _launch("gemv", x, words, sz, ys, group)  # autotune each first, so do_bench times the tuned kernels only
    _launch("gemm", x, words, sz, y1, group)
    t_gemv = do_bench(lambda: _launch("gemv", x, words, sz, ys, group))
    t_gemm = do_bench(lambda: _launch("gemm", x, words, sz, y1, group))
    _CHOICE[key] = "gemm" if t_gemm < t_gemv else "gemv"
    return _CHOICE[key]


def partials(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, kernel: str) -> torch.Tensor:
    """fp32 partial products [S, M, N] of x [M, K] (bf16/fp16) times the int4 weight (`pack`ed words [N, K/8],
    sz [N, K/group, 2]) transposed, through `kernel` ("gemv": M <= GEMV_MAX_M; "gemm"), one per slice of K
    (`splits`); their sum over S is the product. Left unsummed so a compiled step fuses the sum into whatever
    consumes the result (bias, activation, residual)."""
    if triton is None:
        raise RuntimeError("the W4A16 kernels need Triton (pip install triton); use the tinygemm int4 kernel instead")
    M, K = x.shape
    N, G = words.shape[0], sz.shape[1]
    if words.shape[1] * 8 != K or G * group != K or group % 8 or group & (group - 1):
        raise ValueError(f"W4A16 shapes do not agree: x {tuple(x.shape)}, words {tuple(words.shape)}, "
                         f"sz {tuple(sz.shape)}, group {group} (a power of two dividing in_features)")
    if kernel not in KERNELS or (kernel == "gemv" and M > GEMV_MAX_M):
        raise ValueError(f"W4A16 kernel must be 'gemm', or 'gemv' for at most {GEMV_MAX_M} rows; got {kernel!r} "
                         f"for {M} rows")
    y = torch.empty(splits(kernel, N, K, group), M, N, dtype=torch.float32, device=x.device)
    _launch(kernel, x.contiguous(), words, sz, y, group)
    return y


@torch.library.custom_op("effllm::w4a16_partials", mutates_args=())
def w4a16_partials(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, kernel: str) -> torch.Tensor:
    """`partials` as an opaque torch op, so a `torch.compile`d decode step calls the autotuned kernels as they are."""
    return partials(x, words, sz, group, kernel)


@w4a16_partials.register_fake
def _(x, words, sz, group, kernel):
    N = words.shape[0]
    return x.new_empty(splits(kernel, N, x.shape[1], group), x.shape[0], N, dtype=torch.float32)


def matmul(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int,
           few_rows: str | None = None) -> torch.Tensor:
    """x [M, K] times the int4 weight transposed: [M, N] in x's dtype (fp32 accumulation). few_rows: the kernel
    `choose` picked for this weight at one row (a compiled step must pass it: choosing times kernels); None chooses
    now."""
    if x.shape[0] == 1 and few_rows is not None:
        kernel = few_rows
    else:
        kernel = choose(x, words, sz, group)
    return torch.ops.effllm.w4a16_partials(x, words, sz, group, kernel).sum(0).to(x.dtype)
