"""The backbone against transformers' reference implementations, cached decoding, generate, save/load, peft."""
import itertools
import math

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from effllm_utils import models
from effllm_utils.measure import metrics
from effllm_utils.models import EffLLMForCausalLM

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _load(ours, ref):
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
def test_mha_gqa_mqa_with_rope_match_qwen2(attention):
    kv = {"mha": 4, "gqa": 2, "mqa": 1}[attention]
    ref = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=kv, intermediate_size=64, max_position_embeddings=128,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       tie_word_embeddings=False, attn_implementation="eager")).eval()
    ours = EffLLMForCausalLM(models.config("test", attention=attention, num_key_value_heads=kv, qkv_bias=True)).eval()
    _load(ours, ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, use_cache=False).logits, ref(IDS).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_mla_matches_deepseek_v3(q_lora_rank):
    ref_cfg = DeepseekV3Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                               first_k_dense_replace=2, q_lora_rank=q_lora_rank, kv_lora_rank=16,
                               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, rope_interleave=False,
                               max_position_embeddings=128, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                               attn_implementation="eager")
    ref = DeepseekV3ForCausalLM(ref_cfg).eval()
    ours = EffLLMForCausalLM(models.config("test", attention="mla", q_lora_rank=q_lora_rank)).eval()
    _load(ours, ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, use_cache=False).logits, ref(IDS).logits, atol=1e-5, rtol=1e-4)
    # the cache holds the latent: kv_lora_rank + rope dims per token and layer, not 2 x heads x head_dim
    cache = ours(IDS, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape == (2, 1, 24, 16) and cache.layers[0].values.shape == (2, 1, 24, 4)
    assert ours.kv_bytes_per_token(torch.float32) == 2 * (16 + 4) * 4


def test_moe_block_matches_mixtral():
    cfg = models.config("test", ffn="moe")
    ref = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=32, num_local_experts=4,
                                              num_experts_per_tok=2)).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = EffLLMForCausalLM(cfg).model.layers[0].mlp
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        out, aux = ours(x)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)
    assert aux.item() >= 0.99  # the Switch balance loss is >= 1 (1 when perfectly balanced)


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_every_variant_trains_under_bf16_autocast(attention):
    m = EffLLMForCausalLM(models.config("test", attention=attention, ffn="moe"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and m.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_moe_aux_loss_is_minimal_for_a_uniform_router():
    moe = EffLLMForCausalLM(models.config("test", ffn="moe")).model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.zero_()
        _, aux = moe(torch.randn(1, 64, 32))
    assert aux.item() == pytest.approx(1.0, abs=1e-5)


VARIANTS = list(itertools.product(models.ATTENTIONS, models.POSITIONS, models.FFNS))


@pytest.mark.parametrize("attention,position,ffn", VARIANTS)
def test_cached_decoding_equals_full_forward(attention, position, ffn):
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention=attention, position=position, ffn=ffn)).eval()
    with torch.no_grad():
        full = m(IDS, use_cache=False).logits
        first = m(IDS[:, :10], use_cache=True)
        steps, cache = [first.logits], first.past_key_values
        steps.append(m(IDS[:, 10:14], past_key_values=cache).logits)  # a multi-token chunk with a cache offset
        for t in range(14, 24):
            steps.append(m(IDS[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_generate_with_and_without_cache(attention):
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", attention=attention, ffn="moe")).eval()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    a = m.generate(IDS[:, :6], use_cache=True, **kw)
    b = m.generate(IDS[:, :6], use_cache=False, **kw)
    assert a.shape == (2, 18) and torch.equal(a, b)


def test_auto_classes_save_load_and_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    m = EffLLMForCausalLM(models.config("test", attention="mla", position="relative")).eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).attention == "mla"
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, m(IDS).logits)
    lora = get_peft_model(m, LoraConfig(r=4, target_modules=["kv_b_proj", "o_proj"]))
    assert 0 < sum(p.numel() for p in lora.parameters() if p.requires_grad) < 0.2 * m.num_parameters()


def test_kv_bytes_and_flops_follow_the_config():
    for att, per_layer in (("mha", 2 * 4 * 8), ("gqa", 2 * 2 * 8), ("mqa", 2 * 1 * 8), ("mla", 16 + 4),
                           ("nsa", 2 * 2 * 8)):
        m = EffLLMForCausalLM(models.config("test", attention=att))
        assert m.kv_bytes_per_token(torch.bfloat16) == 2 * per_layer * 2, att
    m = EffLLMForCausalLM(models.config("test", attention="gqa"))
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    shape = m.config.shape()
    assert metrics.forward_flops_per_token(shape, 1) == 2 * linear + 2 * 2 * 4 * 16 * 1


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        models.config("test", attention="flash")
    with pytest.raises(ValueError, match="unknown position 'alibi'"):
        models.config("test", position="alibi")
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads"):
        models.config("test", num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        models.config("huge")
    m = EffLLMForCausalLM(models.config("test", position="learned"))
    with pytest.raises(ValueError, match="beyond max_position_embeddings 128"):
        m(torch.zeros(1, 129, dtype=torch.long))


def test_sinusoidal_table_keeps_vaswanis_ratio_of_position_to_token_content():
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test", position="sinusoidal", hidden_size=128)).model
    table = m.sinusoidal
    assert table[0, 1] == pytest.approx(m.config.initializer_range)  # cos(0) scaled, sin(0) = 0
    assert table[5, 0] == pytest.approx(math.sin(5) * m.config.initializer_range, rel=1e-5)
    # Vaswani et al.: token embeddings of std 1 (after the sqrt(d_model) scale) + a table of RMS 1/sqrt(2)
    ratio = (table.pow(2).mean().sqrt() / m.embed_tokens.weight.std()).item()
    assert ratio == pytest.approx(2 ** -0.5, rel=0.05)
    seen = []  # what reaches the first layer: the token embedding plus the scaled table's row of each position
    m.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    x = torch.randint(0, m.config.vocab_size, (1, 8))
    with torch.no_grad():
        m(x)
        assert torch.allclose(seen[0], m.embed_tokens(x) + table[:8])


def _nsa_pair(window, selected, device="cpu"):
    torch.manual_seed(0)  # head_dim 16: the smallest FlexAttention's CUDA kernel takes
    kw = dict(attention="nsa", nsa_window=window, nsa_num_selected=selected, hidden_size=64)
    ref = EffLLMForCausalLM(models.config("test", nsa_kernel="reference", **kw)).to(device)
    flex = EffLLMForCausalLM(models.config("test", nsa_kernel="flex", **kw)).to(device)
    flex.load_state_dict(ref.state_dict())
    return ref, flex


@pytest.mark.parametrize("window,selected", [(8, 2), (5, 1)])
def test_nsa_flex_kernel_equals_the_dense_mask_reference(window, selected):
    """The FlexAttention path (used on CUDA) computes what the reference's dense masks compute, over a length where
    selection is sparse (6 blocks of 4: 2 selected + the first + the current). Gradients: the CUDA test below."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    ref, flex = _nsa_pair(window, selected)
    with torch.no_grad():
        torch.testing.assert_close(flex(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        # with padding or a cache offset the flex config falls back to the reference
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        torch.testing.assert_close(flex(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits)
    g_ref = ref.generate(ids[:, :10], max_new_tokens=6, do_sample=False)
    assert torch.equal(flex.generate(ids[:, :10], max_new_tokens=6, do_sample=False), g_ref)
    with pytest.raises(ValueError, match="nsa_kernel='flex' cannot train on CPU"):
        flex(input_ids=ids, labels=ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fused kernel and backward need CUDA")
def test_nsa_flex_kernel_gradients_on_cuda():
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(4)).cuda()
    ref, flex = _nsa_pair(16, 2, "cuda")  # 16 blocks of 4 (test config), 2 selected: sparse
    outs = []
    for m in (ref, flex):
        out = m(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-4, rtol=1e-3)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, atol=2e-4, rtol=1e-3, msg=n)


def test_unknown_nsa_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown nsa_kernel 'triton'; choose one of auto, reference, flex"):
        models.config("test", attention="nsa", nsa_kernel="triton")
