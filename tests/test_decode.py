"""The static-cache decoder against transformers' generate, and Qwen2 checkpoints through it."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from effllm_utils import models
from effllm_utils.engine import decode
from effllm_utils.models import EffLLMForCausalLM


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
def test_static_decoder_matches_generate(attention):
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention=attention)).eval()
    ids = torch.randint(0, 128, (2, 7))
    ref = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 7:]
    dec = decode.StaticDecoder(m, batch_size=2, max_len=32)
    tokens, stamps = dec.generate(ids, 12)
    assert torch.equal(tokens, ref) and len(stamps) == 12
    with torch.no_grad():  # the step's logits equal the full forward's at each position
        full = m(torch.cat([ids, tokens], 1), use_cache=False).logits[:, 7:18]
    dec.prefill(ids)
    logits = [dec.step(tokens[:, i:i + 1], 7 + i).clone() for i in range(11)]
    torch.testing.assert_close(torch.stack(logits, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_checkpoint_through_the_fast_path(family):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    hf = (Qwen2ForCausalLM(Qwen2Config(**dims)) if family == "qwen2" else
          LlamaForCausalLM(LlamaConfig(**dims, rope_theta=100000.0))).eval()
    ours = decode.from_hf(hf)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, use_cache=False).logits, hf(ids).logits, atol=1e-5, rtol=1e-4)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(decode.StaticDecoder(ours, 1, 16).generate(ids, 8)[0], ref)
    assert ours.config.qkv_bias == (family == "qwen2")


def test_other_families_are_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="the static decoder runs the effllm backbone and qwen2/llama checkpoints, "
                                         "not gpt2"):
        decode.from_hf(gpt2)


def test_limits_and_roofline():
    m = EffLLMForCausalLM(models.config("test", attention="mla"))
    with pytest.raises(ValueError, match="StaticDecoder supports mha/gqa/mqa \\+ rope \\+ dense, not mla"):
        decode.StaticDecoder(m, 1, 16)
    dec = decode.StaticDecoder(EffLLMForCausalLM(models.config("test")), 1, 16)
    with pytest.raises(ValueError, match="exceed max_len 16"):
        dec.generate(torch.zeros(1, 10, dtype=torch.long), 8)
    g = EffLLMForCausalLM(models.config("test"))
    assert decode.roofline_fraction(100.0, g, 100.0 * decode.weight_bytes(g)) == pytest.approx(1.0)


def test_int4_quantization_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    q, sz = decode.quantize_int4(w, 64)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15 and sz.shape == (4, 16, 2)
    deq = decode.dequantize_int4(q, sz, 64)
    step = sz[..., 0].float().transpose(0, 1).repeat_interleave(64, dim=1)  # [16, 256] scale per element
    assert bool(((deq - w).abs() <= step / 2 + 0.02 * w.abs().max()).all())  # rounding + bf16 scale/zero
    with pytest.raises(ValueError, match="divisible by the group size 128"):
        decode.quantize_int4(torch.randn(8, 96))


def test_int4_decoder_matches_the_dequantized_model(monkeypatch):
    """The packed tinygemm path computes the same function as a bf16 model holding the dequantized weights."""
    monkeypatch.setattr(decode, "KEEP_INT4_REFERENCE", True)
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).to(torch.bfloat16).eval()
    dec = decode.StaticDecoder(m, batch_size=2, max_len=24, weights="int4", group_size=32)
    ref = EffLLMForCausalLM(models.config("test", attention="gqa")).to(torch.bfloat16).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for d, layer in zip(dec.layers, ref.model.layers):
            a, f = layer.self_attn, layer.mlp
            qkv = decode.dequantize_int4(d["qkv"].q, d["qkv"].sz, 32).to(torch.bfloat16)
            for mod, w in zip((a.q_proj, a.k_proj, a.v_proj), qkv.split(dec.split)):
                mod.weight.copy_(w)
            gate, up = decode.dequantize_int4(d["gate_up"].q, d["gate_up"].sz, 32).to(torch.bfloat16).chunk(2)
            f.gate_proj.weight.copy_(gate)
            f.up_proj.weight.copy_(up)
            a.o_proj.weight.copy_(decode.dequantize_int4(d["o"].q, d["o"].sz, 32))
            f.down_proj.weight.copy_(decode.dequantize_int4(d["down"].q, d["down"].sz, 32))
        ref.lm_head.weight.copy_(decode.dequantize_int4(dec.lm_head.q, dec.lm_head.sz, 32))
    ids = torch.randint(0, 128, (2, 6))
    tokens, stamps = dec.generate(ids, 6)
    assert tokens.shape == (2, 6) and len(stamps) == 6 and stamps == sorted(stamps)
    with torch.no_grad():
        full = ref(torch.cat([ids, tokens], 1), use_cache=False).logits[:, 5:11].float()
        dec.prefill(ids)
        steps = torch.stack([dec.step(tokens[:, i:i + 1], 6 + i).float() for i in range(5)], 1)
    torch.testing.assert_close(steps, full[:, 1:6], atol=0.05, rtol=0.05)  # bf16 arithmetic, two kernels
    assert torch.equal(tokens[:, 0], full[:, 0].argmax(-1))
    # int4 reads fewer bytes than bf16 and the error says what to fix for other dtypes
    assert dec.read_bytes < decode.StaticDecoder(m, 2, 24).read_bytes
    with pytest.raises(ValueError, match="bf16 activations; load the model in bf16, not float32"):
        decode.StaticDecoder(m.float(), 1, 16, weights="int4", group_size=32)


def test_compiled_step_matches_eager():
    """torch.compile of the whole step (greedy feedback and history included) decodes the same tokens (fp32)."""
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).eval()
    ids = torch.randint(0, 128, (1, 6))
    ref = decode.StaticDecoder(m, 1, 24).generate(ids, 8)[0]
    assert torch.equal(decode.StaticDecoder(m, 1, 24, compile=True).generate(ids, 8)[0], ref)


@pytest.mark.parametrize("V,chunk", [(151_936, 1024), (4096, 1024), (1000, 1024), (5000, 64)])
def test_two_stage_greedy_equals_argmax_ties_included(V, chunk):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(3, V, generator=g).to(torch.bfloat16)  # bf16: many exact ties among the top values
    logits[0, [7, V - 1]] = 100.0  # a tie between the first slice and the tail: the first index wins
    logits[1, V - 1] = 100.0  # the max only in the tail
    logits[2, [(chunk + 3) % V, (2 * chunk + 5) % V]] = 50.0  # a tie across two slices
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(decode.greedy(logits, chunk), want)
    assert want[0, 0] == 7 and want[1, 0] == V - 1
