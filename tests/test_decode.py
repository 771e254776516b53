"""The static-cache decoder against transformers' generate, and Qwen2 checkpoints through it."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from effllm_utils import decode, models
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


def test_qwen2_checkpoint_through_the_fast_path():
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=True)).eval()
    ours = decode.from_qwen2(hf)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, use_cache=False).logits, hf(ids).logits, atol=1e-5, rtol=1e-4)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(decode.StaticDecoder(ours, 1, 16).generate(ids, 8)[0], ref)


def test_limits_and_roofline():
    m = EffLLMForCausalLM(models.config("test", attention="mla"))
    with pytest.raises(ValueError, match="StaticDecoder supports mha/gqa/mqa \\+ rope \\+ dense, not mla"):
        decode.StaticDecoder(m, 1, 16)
    dec = decode.StaticDecoder(EffLLMForCausalLM(models.config("test")), 1, 16)
    with pytest.raises(ValueError, match="exceed max_len 16"):
        dec.generate(torch.zeros(1, 10, dtype=torch.long), 8)
    g = EffLLMForCausalLM(models.config("test"))
    assert decode.roofline_fraction(100.0, g, 100.0 * decode.weight_bytes(g)) == pytest.approx(1.0)
