"""A CPU selective scan for `transformers`' Mamba: the same recurrence, without the [batch, channels, length, state]
intermediates of the library's PyTorch fallbacks.

Without the `mamba_ssm` CUDA kernels, `transformers` (5.x) computes the selective scan in PyTorch: the discretised
A and B·u for every position are materialised as [batch, d_inner, length, d_state] tensors, then scanned by
`mambapy`'s parallel scan (`use_mambapy=True`) or by a Python loop whose slice backward allocates a full-size zero
tensor per position. On 2 CPU cores, at the tiny profile's shape (16 x 128 tokens, d_inner 288, d_state 16), one
training step took 2.5 s with the parallel scan and 23 s with the loop (measured), which made Mamba two thirds of
the attention_free study's time and its tokens/s a measure of those intermediates rather than of the architecture.

`selective_scan` runs the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t h_t (+ D u_t, x silu(z))
position by position on [batch, d_inner, d_state] tiles that stay in cache, keeps one state in `CHUNK` (16) for the
backward — which recomputes a chunk's states from it, as mamba_ssm's CUDA kernel recomputes rather than stores — and
has a hand-written backward (a reverse scan of the state adjoint; the reductions over channels, states and positions
are batched matmuls). Chunking cut the attention_free study's Mamba AMU from 0.35 to 0.25 GB at the same speed
(2026-11-23, 3,411 vs 3,315 tokens/s, within the VM's drift). It is checked against the library's implementation
(outputs and every gradient, float64) in tests/test_models.py; one forward + backward of a tiny-profile layer
measured 0.11-0.18 s against 0.67-0.81 s for the parallel scan (5-7x).

`install()` routes `transformers`' Mamba scan on CPU tensors through it; every other call (CUDA, where
`mamba_ssm` or the library's own path decides; the cached prefill that returns the last state; tracing under
dynamo) goes to the library's function unchanged. `build_baseline("mamba", ...)` installs it.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

IMPLEMENTATION = "effllm CPU sequential selective scan (effllm_utils.models.mamba_scan)"


CHUNK = 16  # positions per chunk: one state in CHUNK is kept for the backward, which recomputes the rest (as
#             mamba_ssm's CUDA kernel recomputes its states rather than storing them)


class _SelectiveScan(torch.autograd.Function):
    """y[b, d, l] = sum_n h[b, l, d, n] C[b, n, l] with h_l = exp(dt_l A) * h_{l-1} + (dt_l u_l) B_l, h_{-1} = 0.
    u, dt: [batch, d, length]; A: [d, n]; Bm, C: [batch, n, length]; one dtype.

    The states are computed `chunk` positions at a time; only the last state of each chunk is kept for the backward,
    which recomputes a chunk's states from the state before it (memory [batch, length / chunk, d, n] instead of
    [batch, length, d, n], for one more forward recurrence)."""

    @staticmethod
    def _states(h, dt_l, dtu, B_l, A, s, e, out):
        """out[:, t - s] = the state at t, for t in [s, e), from h (the state at s - 1); returns the state at e - 1."""
        for t in range(s, e):
            ht = out[:, t - s]
            torch.mul(torch.exp(dt_l[:, t, :, None] * A), h, out=ht)
            ht.addcmul_(dtu[:, t, :, None], B_l[:, t, None, :])
            h = ht
        return h

    @staticmethod
    def forward(ctx, u, dt, A, Bm, C, chunk: int):
        b, d, L = u.shape
        n = A.shape[1]
        dt_l = dt.transpose(1, 2).contiguous()  # [b, L, d]
        dtu = (dt * u).transpose(1, 2).contiguous()  # [b, L, d]
        B_l = Bm.transpose(1, 2).contiguous()  # [b, L, n]
        C_l = C.transpose(1, 2).contiguous()
        starts = list(range(0, L, chunk))
        ends = starts[1:] + [L]
        bounds = u.new_empty(b, len(starts), d, n)  # the last state of every chunk
        work = u.new_empty(b, min(chunk, L), d, n)
        y = u.new_empty(b, L, d)
        h = u.new_zeros(b, d, n)
        for c, (s, e) in enumerate(zip(starts, ends)):
            k = e - s
            h = _SelectiveScan._states(h, dt_l, dtu, B_l, A, s, e, work)
            y[:, s:e] = torch.matmul(work[:, :k].reshape(b * k, d, n), C_l[:, s:e].reshape(b * k, n, 1)).view(b, k, d)
            bounds[:, c] = h
            h = bounds[:, c]
        ctx.save_for_backward(u, A, bounds, dt_l, dtu, B_l, C_l)
        ctx.spans = list(zip(starts, ends))
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy):
        u, A, bounds, dt_l, dtu, B_l, C_l = ctx.saved_tensors
        b, L, d = dt_l.shape
        n = A.shape[1]
        spans = ctx.spans
        gy_l = gy.to(u.dtype).transpose(1, 2).contiguous()  # [b, L, d]
        gC = u.new_empty(b, L, n)
        gB = u.new_empty(b, L, n)
        g_dtu = u.new_empty(b, L, d)
        g_decay = u.new_zeros(b, L, d)  # d loss / d dt through exp(dt A)
        gA_b = u.new_zeros(b, d, n)
        H = u.new_empty(b, spans[0][1], d, n)  # one chunk's states (the first chunk is the longest), recomputed
        G = torch.empty_like(H)  # their adjoints: G_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1}
        g_next = a_next = None  # the adjoint and decay at the position after the chunk
        for c in range(len(spans) - 1, -1, -1):
            s, e = spans[c]
            k = e - s
            h0 = bounds[:, c - 1] if c > 0 else u.new_zeros(b, d, n)
            _SelectiveScan._states(h0, dt_l, dtu, B_l, A, s, e, H)
            for t in range(e - 1, s - 1, -1):
                i = t - s
                gt = G[:, i]
                torch.mul(gy_l[:, t, :, None], C_l[:, t, None, :], out=gt)
                if a_next is not None:
                    gt.addcmul_(a_next, g_next)
                a = torch.exp(dt_l[:, t, :, None] * A)
                if t > 0:  # h_{-1} = 0: the first decay gets no gradient
                    prev = H[:, i - 1] if i > 0 else h0
                    w = gt * a * prev  # d loss / d (dt_t A)
                    g_decay[:, t] = (w * A).sum(-1)
                    gA_b.addcmul_(w, dt_l[:, t, :, None])
                a_next, g_next = a, gt
            g_next = g_next.clone()  # G is overwritten by the next (earlier) chunk
            Hk, Gk = H[:, :k].reshape(b * k, d, n), G[:, :k].reshape(b * k, d, n)
            gC[:, s:e] = torch.matmul(gy_l[:, s:e].reshape(b * k, 1, d), Hk).view(b, k, n)
            g_dtu[:, s:e] = torch.matmul(Gk, B_l[:, s:e].reshape(b * k, n, 1)).view(b, k, d)
            gB[:, s:e] = torch.matmul(dtu[:, s:e].reshape(b * k, 1, d), Gk).view(b, k, n)
        g_dt = g_dtu * u.transpose(1, 2) + g_decay
        g_u = g_dtu * dt_l
        return (g_u.transpose(1, 2), g_dt.transpose(1, 2), gA_b.sum(0), gB.transpose(1, 2), gC.transpose(1, 2),
                None)


def selective_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, chunk: int = CHUNK,
                   **_) -> torch.Tensor:
    """`transformers.models.mamba.modeling_mamba.mamba_selective_scan`'s contract (without `return_last_state`):
    hidden_states, dt, z: [batch, d, length]; A: [d, n]; B, C: [batch, n, length]; D, delta_bias: [d]. The scan runs
    in float32 (float64 for float64 inputs); the output has the input's dtype. `chunk`: positions whose states the
    backward recomputes from the one state it keeps per chunk."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")
    dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    c = torch.promote_types(dtype, torch.float32)
    with torch.autocast(hidden_states.device.type, enabled=False):  # the scan's dtype, whatever the autocast
        y = _SelectiveScan.apply(*(t.to(c) for t in (hidden_states, dt, A, B, C)), chunk)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


def install() -> None:
    """Route `transformers`' Mamba selective scan on CPU through `selective_scan` (idempotent; see the module
    docstring for what stays with the library)."""
    from transformers.models.mamba import modeling_mamba as mm

    if getattr(mm.mamba_selective_scan, "_effllm_original", None) is not None:
        return
    original = mm.mamba_selective_scan

    def mamba_selective_scan(hidden_states, *args, return_last_state: bool = False, **kwargs):
        if (hidden_states.device.type == "cpu" and not return_last_state
                and not torch.compiler.is_compiling()
                and kwargs.get("cu_seqlens") is None and kwargs.get("seq_idx") is None):
            return selective_scan(hidden_states, *args, **kwargs)
        return original(hidden_states, *args, return_last_state=return_last_state, **kwargs)

    mamba_selective_scan._effllm_original = original
    mm.mamba_selective_scan = mamba_selective_scan


def scan_in_use(device: str) -> str:
    """Which selective scan a Mamba training run on `device` uses (recorded with its measurements)."""
    if str(device).startswith("cpu"):
        return IMPLEMENTATION
    if importlib.util.find_spec("mamba_ssm") is not None:
        return "mamba_ssm selective_scan_fn (CUDA kernels, through transformers)"
    return ("transformers' PyTorch fallback (mambapy parallel scan): install mamba-ssm and causal-conv1d for the "
            "CUDA kernels")


def library_scan():
    """`transformers`' own selective scan (the reference `selective_scan` is tested against)."""
    from transformers.models.mamba import modeling_mamba as mm

    return getattr(mm.mamba_selective_scan, "_effllm_original", mm.mamba_selective_scan)


@contextlib.contextmanager
def using_library_scan():
    """Within the block, `transformers`' Mamba runs its own scan (for comparisons: `make bench`'s mamba_library)."""
    from transformers.models.mamba import modeling_mamba as mm

    routed = mm.mamba_selective_scan
    mm.mamba_selective_scan = library_scan()
    try:
        yield
    finally:
        mm.mamba_selective_scan = routed
