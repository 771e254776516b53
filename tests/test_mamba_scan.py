"""effllm's CPU selective scan against `transformers`' own Mamba scan: outputs and every gradient, and the model."""
import pytest
import torch
from transformers.models.mamba import modeling_mamba as mm

from effllm_utils.models import mamba_scan
from effllm_utils.models.baselines import build_baseline


def _inputs(b=2, d=6, L=9, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype).requires_grad_()

    A = (-torch.rand(d, n, generator=g, dtype=dtype) - 0.5).requires_grad_()
    return dict(hidden_states=r(b, d, L), dt=r(b, d, L), A=A, B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L),
                delta_bias=r(d), delta_softplus=True)


def _grads(y, x, w):
    names = [k for k, v in x.items() if torch.is_tensor(v)]
    return dict(zip(names, torch.autograd.grad((y * w).sum(), [x[k] for k in names])))


def _naive(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus):
    """The recurrence written out with autograd, in the inputs' dtype (the float64 reference)."""
    dt = torch.nn.functional.softplus(dt + delta_bias[:, None]) if delta_softplus else dt + delta_bias[:, None]
    h = hidden_states.new_zeros(hidden_states.shape[0], A.shape[0], A.shape[1])
    ys = []
    for t in range(hidden_states.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * hidden_states[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + hidden_states * D[:, None]) * torch.nn.functional.silu(z)


@pytest.mark.parametrize("chunk", [1, 4, 16])  # a state per position; 3 chunks, the last partial; one chunk
def test_selective_scan_matches_the_recurrence_in_float64(chunk):
    """Also across the chunks whose states the backward recomputes from the one kept per chunk."""
    x = _inputs()
    ref, ours = _naive(**x), mamba_scan.selective_scan(**x, chunk=chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    g_ref, g_ours = _grads(ref, x, w), _grads(ours, x, w)
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-10, atol=1e-10, msg=lambda m: f"d/d{k}: {m}")


def test_selective_scan_refuses_an_empty_chunk():
    with pytest.raises(ValueError, match="chunk must be a positive number of positions, got 0"):
        mamba_scan.selective_scan(**_inputs(), chunk=0)


@pytest.mark.parametrize("use_mambapy", [False, True])
def test_selective_scan_matches_transformers_outputs_and_gradients(use_mambapy):
    """Against the library in float32 (its scan casts B and the inputs to float32 whatever their dtype)."""
    x = _inputs(b=3, d=16, L=33, n=8, dtype=torch.float32)
    ref = mamba_scan.library_scan()(**x, use_mambapy=use_mambapy)
    ours = mamba_scan.selective_scan(**x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)
    g_ref, g_ours = _grads(ref, x, w), _grads(ours, x, w)
    for k in g_ref:
        scale = g_ref[k].abs().max().item()
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"d/d{k}: {m}")


def test_selective_scan_keeps_float32_and_handles_length_one():
    x = _inputs(L=1, dtype=torch.float32)
    y = mamba_scan.selective_scan(**x)
    assert y.dtype == torch.float32 and y.shape == (2, 6, 1)
    torch.testing.assert_close(y, mamba_scan.library_scan()(**x), rtol=1e-5, atol=1e-6)


def test_install_routes_cpu_training_and_leaves_the_cached_prefill_to_transformers(monkeypatch):
    mamba_scan.install()
    mamba_scan.install()  # idempotent: the library's function is kept once
    routed = mm.mamba_selective_scan
    assert routed._effllm_original is mamba_scan.library_scan() and routed is not mamba_scan.library_scan()
    calls = []
    monkeypatch.setattr(mamba_scan, "selective_scan", lambda *a, **k: calls.append("ours") or "ours")
    x = _inputs()
    assert routed(**x) == "ours"
    y, state = routed(**x, return_last_state=True)  # generation's prefill keeps its final state: the library's
    assert calls == ["ours"] and state.shape == (2, 6, 4)


def test_mamba_model_loss_and_gradients_equal_the_library_scan(monkeypatch):
    torch.manual_seed(0)
    model = build_baseline("mamba", 60_000, n_layers=2, vocab_size=128, context=32)  # installs the scan
    ids = torch.randint(0, 128, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    monkeypatch.setattr(mm, "mamba_selective_scan", mamba_scan.library_scan())
    ref = loss_and_grads()
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")
    monkeypatch.undo()
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)  # cached decoding still runs
    assert out.shape == (2, 9)


def test_records_name_the_scan(monkeypatch):
    assert mamba_scan.scan_in_use("cpu") == mamba_scan.IMPLEMENTATION
    monkeypatch.setattr(mamba_scan.importlib.util, "find_spec", lambda name: None)
    assert "install mamba-ssm" in mamba_scan.scan_in_use("cuda:0")
    monkeypatch.setattr(mamba_scan.importlib.util, "find_spec", lambda name: object() if name == "mamba_ssm" else None)
    assert mamba_scan.scan_in_use("cuda").startswith("mamba_ssm")


def test_mamba_trains_under_cpu_bf16_autocast(monkeypatch):
    """The scan runs in float32 inside an autocast region (the library's bmm would run in bf16 there)."""
    torch.manual_seed(0)
    model = build_baseline("mamba", 60_000, n_layers=2, vocab_size=128, context=32)
    ids = torch.randint(0, 128, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    assert all(torch.isfinite(g).all() for g in ours[1])
    monkeypatch.setattr(mm, "mamba_selective_scan", mamba_scan.library_scan())
    ref = loss_and_grads()
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-3)
