"""The chunked fused head + cross-entropy (`models.loss.linear_cross_entropy`, config `ce_chunk`) against
`F.cross_entropy` over materialised logits: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from effllm_utils import models
from effllm_utils.models import EffLLMForCausalLM
from effllm_utils.models.loss import linear_cross_entropy


def _grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    loss = fn()
    (3.0 * loss).backward()  # a non-unit upstream gradient must scale the stored ones
    return loss.detach(), [t.grad.clone() for t in leaves]


def test_matches_cross_entropy_fp32_with_ignored_tokens_and_ragged_chunks():
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(50, 24, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 5, 36]] = -100
    ref, (gh, gw) = _grads(lambda: F.cross_entropy(F.linear(h, w), labels, ignore_index=-100), h, w)
    for chunk in (8, 37, 100):
        got, (gh2, gw2) = _grads(lambda: linear_cross_entropy(h, w, labels, chunk), h, w)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh2, gh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw2, gw, rtol=1e-4, atol=1e-6)
        assert gw2.dtype == torch.float32 and gh2.dtype == torch.float32
    assert gh2[[0, 5, 36]].abs().max() == 0  # ignored tokens get no gradient


def test_bf16_autocast_matches_autocast_reference():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.2 * torch.randn(300, 32)).requires_grad_()
    labels = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, (gh, gw) = _grads(lambda: F.cross_entropy(F.linear(h, w).float(), labels), h, w)
        got, (gh2, gw2) = _grads(lambda: linear_cross_entropy(h, w, labels, 16), h, w)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh2, gh, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw2, gw, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_and_gradients_equal_with_ce_chunk(tie):
    torch.manual_seed(0)
    plain = EffLLMForCausalLM(models.config("test", attention="gqa", tie_word_embeddings=tie))
    fused = EffLLMForCausalLM(models.config("test", attention="gqa", tie_word_embeddings=tie, ce_chunk=5))
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    out_p, out_f = plain(input_ids=ids, labels=ids, use_cache=False), fused(input_ids=ids, labels=ids, use_cache=False)
    assert out_f.logits is None  # the point: no [tokens, vocab] logits kept
    torch.testing.assert_close(out_f.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    out_p.loss.backward()
    out_f.loss.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # evaluation keeps the plain path and its logits
        ev = fused(input_ids=ids, labels=ids, use_cache=False)
    assert ev.logits is not None and torch.allclose(ev.loss, out_p.loss.detach(), atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="wants h \\[N, hidden\\]"):
        linear_cross_entropy(torch.randn(2, 4, 3), torch.randn(5, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="ce_chunk must be 0"):
        models.EffLLMConfig(ce_chunk=-1)


def test_compiled_model_with_ce_chunk_matches_eager():
    """`make bench` and `train` compile the step: the fused loss compiles (no graph break) to the same numbers."""
    import torch._dynamo

    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention="gqa", ce_chunk=5))
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    ref, grads = _grads(lambda: m(input_ids=ids, labels=ids, use_cache=False).loss, *m.parameters())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cm = torch.compile(m, fullgraph=True)
    got, grads2 = _grads(lambda: cm(input_ids=ids, labels=ids, use_cache=False).loss, *m.parameters())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
