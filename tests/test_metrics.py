import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from effllm_utils.measure import metrics as M


def test_every_metric_has_unit_direction_and_description():
    for key, m in M.METRICS.items():
        assert m.key == key and m.unit and m.description
        assert m.better in ("lower", "higher", None)
    assert M.better("al_s") == "lower" and M.better("it") == "higher"
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        M.better("speed")


def test_time_average_weights_by_time():
    # 10 for 1 s then a ramp 10->30 over 1 s: integral 10 + 20 = 30 over 2 s
    assert M.time_average([10, 10, 30], [0, 1, 2]) == pytest.approx(15.0)
    assert M.time_average([7], [3.0]) == 7.0
    with pytest.raises(ValueError, match="equally long"):
        M.time_average([1, 2], [0])


def test_integrate_power_to_energy():
    assert M.integrate([100, 100, 200], [0, 2, 3]) == pytest.approx(200 + 150)
    with pytest.raises(ValueError, match="at least two samples"):
        M.integrate([1], [0])


def test_amu_pcu_latency_throughputs_energy():
    a = M.amu([40e9, 40e9], [0, 1], 80e9)
    assert a == {"amu_gb": pytest.approx(40.0), "amu_frac": pytest.approx(0.5)}
    assert M.pcu(5e14, 1.0, 1e15) == pytest.approx(0.5)
    assert M.mfu_pct(2e14, 2.0, 1e15) == pytest.approx(10.0)
    lat = M.latency([1, 2, 3, 4, 10])
    assert lat["al_s"] == pytest.approx(4.0) and lat["al_p50_s"] == 3.0
    assert lat["al_p90_s"] == pytest.approx(4 + 0.6 * 6)  # numpy linear interpolation
    assert M.tt(1000, 1e6, 2) == pytest.approx(5e-4)
    assert M.st(32, 1e9, 4) == pytest.approx(8e-9)
    assert M.it(500, 4) == 125
    assert M.aec(3600, 60) == 60
    assert M.j_per_token(10, 4) == 2.5
    with pytest.raises(ValueError, match="positive"):
        M.pcu(1, 0, 1)


def test_mcr_matches_the_papers_quoted_values():
    # the reference README: MCR(int4) = 4 x perf_int4/perf_bf16; Phi-4 quoted 3.9157
    assert M.mcr(0.9789, 1.0) == pytest.approx(3.9156)
    assert M.mcr(0.4712, 0.4719, bits_compressed=16) == pytest.approx(0.99852, abs=1e-5)  # DeepSeek-14B fp16
    assert M.mcr_measured(3.0e9, 1.0e9, 0.9, 1.0) == pytest.approx(2.7)


def test_normalize_is_0_1_to_1_in_the_right_direction():
    assert np.allclose(M.normalize([1, 2, 3], "lower"), [1.0, 0.55, 0.1])
    assert np.allclose(M.normalize([1, 2, 3], "higher"), [0.1, 0.55, 1.0])
    assert np.allclose(M.normalize([5, 5], "lower"), [1.0, 1.0])
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        M.normalize([1], "up")


def test_efficiency_score_direction_correct():
    rows = {"amu_gb": [10, 20], "pcu": [0.5, 0.5], "al_s": [1.0, 2.0], "st": [2.0, 1.0], "aec_w": [100, 100]}
    # method 0 is best everywhere -> 1.0; method 1: (0.5 + 1 + 0.5 + 0.5 + 1) / 5
    assert np.allclose(M.efficiency_score(rows), [1.0, 0.7])
    rows["pcu"] = [float("nan")] * 2  # a metric nobody measured drops out
    assert np.allclose(M.efficiency_score(rows), [1.0, (0.5 + 0.5 + 0.5 + 1) / 4])


QWEN_05B = M.TransformerShape(d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
                              vocab_size=151936, attention="gqa")


def test_matmul_params_match_qwen25_05b_model_card():
    # Qwen2.5-0.5B: "Number of Non-Embedding Parameters: 0.36B" (biases excluded here: 0.1% of the total)
    per_layer = M.attention_matmul_params(QWEN_05B) + M.ffn_matmul_params_active(QWEN_05B)
    assert per_layer * 24 == 357_826_560


def test_flop_counter_matches_transformers_qwen2_linear_layers():
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shape = M.TransformerShape(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100,
                               attention="gqa")
    seq = 16
    attn = 2 * 2 * 4 * (16 + 16) * seq  # 2 FLOPs x layers x heads x (qk + v dims) x keys
    assert M.forward_flops_per_token(shape, seq) == 2 * linear + attn
    assert M.training_flops_per_token(shape, seq) == 3 * (2 * linear + attn)


def test_moe_mla_and_kv_bytes():
    moe = M.TransformerShape(d_model=8, n_layers=1, n_heads=2, d_ff=16, vocab_size=10, n_experts=4, top_k=2)
    assert M.ffn_matmul_params_active(moe) == 3 * 8 * 16 * 2 + 8 * 4  # two experts + router
    mla = M.TransformerShape(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=10, attention="mla",
                             q_lora_rank=8, kv_lora_rank=4, qk_nope_head_dim=6, qk_rope_head_dim=2, v_head_dim=6)
    q = 16 * 8 + 8 * 2 * 8
    kv = 16 * (4 + 2) + 4 * 2 * (6 + 6)
    o = 2 * 6 * 16
    assert M.attention_matmul_params(mla) == q + kv + o
    assert M.kv_bytes_per_token(mla, 2) == 2 * (4 + 2) * 2
    assert M.kv_bytes_per_token(QWEN_05B, 2) == 24 * 2 * 2 * 64 * 2
    mqa = M.TransformerShape(d_model=16, n_layers=3, n_heads=4, d_ff=32, vocab_size=10, attention="mqa")
    assert M.kv_bytes_per_token(mqa, 4) == 3 * 2 * 1 * 4 * 4
    nsa = M.TransformerShape(d_model=16, n_layers=1, n_heads=4, d_ff=32, vocab_size=10, attention="nsa",
                             attended_tokens=100)
    dense = M.TransformerShape(d_model=16, n_layers=1, n_heads=4, d_ff=32, vocab_size=10)
    extra = 2 * (3 * 4 * 16 + 2 * 4 * 4 * 4)  # NSA's gate (16 -> 12) and K/V compressions (hd^2 per KV head)
    assert M.forward_flops_per_token(dense, 1000) - M.forward_flops_per_token(nsa, 1000) == 2 * 4 * 8 * 900 - extra
    nsa = M.TransformerShape(d_model=16, n_layers=1, n_heads=4, d_ff=32, vocab_size=10, attention="nsa",
                             nsa_block=16, nsa_selected=4, nsa_window=64)
    attended = 1024 / 16 + (4 + 2) * 16 + 64  # compressed blocks + selected blocks + window
    saved = M.forward_flops_per_token(dense, 1024) - M.forward_flops_per_token(nsa, 1024)
    assert saved == 2 * 4 * 8 * (1024 - attended) - extra
    # a short context the branches cover: each branch over all it can reach, more work than dense attention
    more = M.forward_flops_per_token(nsa, 100) - M.forward_flops_per_token(dense, 100)
    assert more == 2 * 4 * 8 * (100 / 16 + 96 + 64 - 100) + extra


@pytest.mark.parametrize("name,entry", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA GH200 480GB", "GH200 (96 GB HBM3)"),
    ("NVIDIA GH200 144G HBM3e", "GH200 (144 GB HBM3e)"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA L40S", "L40S")])
def test_device_peak_lookup(name, entry):
    assert M.lookup_device_peak(name).name == entry


def test_device_peaks_have_sources_and_measured_fallback():
    for d in M.DEVICE_PEAKS:
        assert d.source.startswith("https://") and d.tflops["bf16"] > d.tflops["fp32"] > 0
    assert M.lookup_device_peak("AMD EPYC 7B13") is None
    value, source = M.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert value == pytest.approx(989.4e12) and "datasheet" in source
    value, source = M.peak_flops("AMD EPYC", "fp32", measured={"fp32": 0.2})
    assert value == pytest.approx(0.2e12) and "measured" in source
    with pytest.raises(ValueError, match="run the hardware study first"):
        M.peak_flops("AMD EPYC", "bf16")


def test_table_headers_come_from_the_metrics_table():
    from effllm_utils.report import views

    assert M.header("amu_gb") == "AMU (GB)" and M.header("al_s", per="iter") == "AL (s/iter)"
    assert M.header("pcu") == "PCU" and M.header("ppl_se") == "PPL s.e." and M.header("param.dataset") == "param.dataset"
    cols = views.columns(("technique", "loss", "loss_se", "fid_before", "al_s"), per={"al_s": "request"},
                         technique="method", loss="eval loss", fid="digits-FID")
    assert cols == {"technique": "method", "loss": "eval loss", "loss_se": "eval loss s.e.",
                    "fid_before": "digits-FID before", "al_s": "AL (s/request)"}
    # every metric column of every study table is a METRICS entry (or one derived from it): no label table beside it
    for table in (views.PRETRAIN_COLUMNS, views.PEFT_COLUMNS, views.QUANT_COLUMNS, views.VLM_COLUMNS):
        for key in table:
            base = next((key.removesuffix(s) for s in M.DERIVED if key.endswith(s)), key)
            assert base in M.METRICS or key in views.STRUCTURE, key


def test_flops_per_token_one_convention_for_every_family_by_hand():
    """2 x the matmul weights a token meets (embeddings out, LM head in) + the family's sequence mixing per layer,
    counted by hand for small configs of each baseline family, and the backbone's analytic count on the same rule."""
    from effllm_utils import models
    from effllm_utils.models import baselines

    def built(family, hidden):
        return baselines._CLASSES[family](baselines._config(family, hidden, 2, 100, 32))

    # Pythia, width 64, one head, 4x MLP: q/k/v 64x192, dense 64x64, MLP 2 x 64x256 per layer; head 64x100;
    # attention QK^T + AV: 2 FLOPs x (64 + 64) x 32 keys per layer
    pythia = 2 * (2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 64 * 100) + 2 * (2 * 128 * 32)
    # Mamba, width 32: d_inner 64, d_state 16, conv 4, dt_rank 2: in_proj 32x128, depthwise conv 64x4, x_proj 64x34,
    # dt_proj 2x64, out_proj 64x32 per layer; head 32x100; the scan 8 FLOPs x 64 x 16 per layer
    mamba = 2 * (2 * (32 * 128 + 64 * 4 + 64 * 34 + 2 * 64 + 64 * 32) + 32 * 100) + 2 * (8 * 64 * 16)
    # RWKV, width 32: key/value/receptance/output 32x32, channel mix 32x128 + 128x32 + 32x32 per layer; head 32x100;
    # WKV 25 FLOPs x 32 channels per layer
    rwkv = 2 * (2 * (4 * 32 * 32 + 2 * 32 * 128 + 32 * 32) + 32 * 100) + 2 * (25 * 32)
    for family, hidden, want in (("pythia", 64, pythia), ("mamba", 32, mamba), ("rwkv", 32, rwkv)):
        assert baselines.forward_flops_per_token(built(family, hidden), family, 32) == want, family
    # the backbone: the same rule (linear weights x 2 + attention) is what its analytic count gives
    m = models.EffLLMForCausalLM(models.config("test", attention="gqa"))
    weights = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
    c = m.config
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * 2 * c.head_dim * 32
    assert M.forward_flops_per_token(c.shape(), 32) == 2 * weights + attention
