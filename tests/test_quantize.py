"""Quantization: every precision round-trips through safetensors, int4 keeps quality within a stated bound, clear
errors for what cannot run; and the inference harness measures what it says."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from effllm_utils import data, models
from effllm_utils.engine import infer, quantize
from effllm_utils.engine.train import TrainConfig, train
from effllm_utils.models import EffLLMForCausalLM, convert
from effllm_utils.report import views
from effllm_utils.studies import quantization

P = dict(group_size=32, calibration_samples=16, calibration_len=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small backbone trained briefly on the corpus (FFN and vocab multiples of 32 for the int4 kernels), in
    Qwen2 format; returns (dir, tokenizer, fp32 perplexity)."""
    tok = data.tokenizer(1024)
    torch.manual_seed(0)
    model = EffLLMForCausalLM(models.config("test", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128))
    ids = data.token_ids("train", tok)
    train(model, ids, data.token_ids("validation", tok), TrainConfig(steps=30, batch_size=16, seq_len=64, lr=3e-3,
                                                                     eval_every=1000, eval_batches=1))
    out = convert.export_qwen2(model, tmp_path_factory.mktemp("ckpt") / "qwen2", tok)
    return out, tok


def ppl(model, tok):
    return infer.perplexity(model, data.token_ids("validation", tok), 64, 16, "cpu")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_cast_and_int8_reload_with_the_same_logits(checkpoint, tmp_path, precision):
    src, tok = checkpoint
    model, info = quantize.build(precision, src, tok, P, "cpu", tmp_path)
    assert info["reload_max_abs_diff"] is not None and info["reload_max_abs_diff"] <= 1e-4
    assert (tmp_path / precision / "model.safetensors").is_file() and info["disk_bytes"] > 0
    fp32_bytes = quantize.disk_bytes(src)
    ratio = fp32_bytes / info["disk_bytes"]
    assert ratio == pytest.approx({"fp32": 1.0, "fp16": 2.0, "bf16": 2.0, "int8": ratio}[precision], rel=0.02)
    if precision == "int8":
        assert 1.3 < ratio < 4.0  # linear weights int8 (+ scales), embeddings stay fp32


def assert_packed_int4(layer, bits):
    """Whatever kernel GPTQModel picks for this CPU (TorchAtenLinear, TorchCpuAvx512Linear, ...), the layer holds its
    weight as packed integers of about `bits` per weight, and no dense floating-point copy of it."""
    n = layer.in_features * layer.out_features
    tensors = list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False))
    packed = sum(t.numel() * t.element_size() * 8 for _, t in tensors if not t.is_floating_point())
    dense = [name for name, t in tensors if t.is_floating_point() and t.numel() >= n // 4]
    assert packed >= bits * n, (type(layer).__name__, packed, bits * n)
    assert not dense, (type(layer).__name__, dense)  # scales are one per group, never one per weight


@pytest.mark.parametrize("precision,bound", [("int4_gptq", 1.10), ("int4_rtn", 1.25)])
def test_int4_quantizes_reloads_and_keeps_perplexity_within_bound(checkpoint, tmp_path, precision, bound):
    src, tok = checkpoint
    from transformers import AutoModelForCausalLM

    base = ppl(AutoModelForCausalLM.from_pretrained(src), tok)
    model, info = quantize.build(precision, src, tok, P, "cpu", tmp_path)
    assert_packed_int4(model.model.layers[0].self_attn.q_proj, bits=4)
    assert quantize.disk_bytes(src) / info["disk_bytes"] > 1.5, info  # the linear weights are 4-bit on disk
    q = ppl(model, tok)
    assert math.isfinite(q) and q <= bound * base, (precision, q, base)  # the stated bound: +10% GPTQ, +25% RTN
    from gptqmodel import GPTQModel

    again = GPTQModel.load(info["path"], device="cpu").model  # a second reload gives the same logits
    x = data.token_ids("validation", tok)[:32][None]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)


def test_fp16_overflow_is_a_clear_error(checkpoint, tmp_path):
    src, tok = checkpoint
    from transformers import AutoModelForCausalLM

    big = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        big.lm_head.weight.mul_(1e6)  # logits beyond fp16's 65504
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(quantize.PrecisionUnsupported, match=r"fp16: non-finite logits on validation text \(overflow\)"):
        quantize.build("fp16", tmp_path / "big", tok, P, "cpu", tmp_path)
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        quantize.build("int3", src, tok, P, "cpu", tmp_path)


def test_export_refuses_what_qwen2_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="only mha/gqa/mqa \\+ rope \\+ dense backbones export to Qwen2"):
        convert.export_qwen2(EffLLMForCausalLM(models.config("test", attention="mla")), tmp_path)


def test_mcr_against_bf16():
    r = {p: {"metrics": {"disk_bytes": b}, "quality": {"ppl": q}, "artifacts": {}}
         for p, b, q in [("bf16", 200, 10.0), ("int4_gptq", 60, 10.5), ("fp32", 400, 10.0)]}
    quantization._add_mcr(r)
    assert r["int4_gptq"]["metrics"]["mcr"] == pytest.approx(4 * 10 / 10.5)
    assert r["int4_gptq"]["metrics"]["mcr_measured"] == pytest.approx(200 / 60 * 10 / 10.5)
    assert r["fp32"]["metrics"]["mcr"] == pytest.approx(0.5) and r["bf16"]["metrics"]["mcr"] == 1.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    m = EffLLMForCausalLM(models.config("test")).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
    assert infer.perplexity(m, torch.arange(500) % 128, 32, 4, "cpu") == pytest.approx(128.0, rel=1e-5)


def test_perplexity_batches_windows_without_changing_the_value():
    torch.manual_seed(0)
    m = EffLLMForCausalLM(models.config("test")).eval()
    ids = torch.randint(0, 128, (700,))
    with torch.no_grad():  # by hand: each window alone, exp of the mean of the window means
        starts = torch.linspace(0, 700 - 32 - 1, 5).long().tolist()
        nll = [torch.nn.functional.cross_entropy(m(ids[s:s + 32][None]).logits[0, :-1], ids[s + 1:s + 32]).item()
               for s in starts]
    want = float(np.exp(np.mean(nll)))
    for per_forward in (32, 64, 2048):  # one window, two (a ragged last chunk), all five per forward
        assert infer.perplexity(m, ids, 32, 5, "cpu", per_forward) == pytest.approx(want, rel=1e-5)


def test_harness_times_every_token_and_measures_side_by_side(capsys):
    torch.manual_seed(0)
    a, b = EffLLMForCausalLM(models.config("test")).eval(), EffLLMForCausalLM(models.config("test")).eval()
    r = infer.timed_request(a, torch.zeros(2, 8, dtype=torch.long), 5, "cpu")
    assert len(r["token_s"]) == 4 and r["tokens"] == 10 and r["e2e_s"] >= r["prefill_s"] + sum(r["token_s"]) - 1e-9
    cfg = infer.InferConfig(prompt_len=8, new_tokens=4, batch_sizes=(1, 2), min_time_s=0.0, min_requests=2)
    out = infer.measure({"a": a, "b": b}, torch.randint(0, 128, (2, 8)), cfg, "cpu")
    assert set(out) == {"a", "b"}
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # the harness's progress bar
    assert bar.startswith("decode a, b: ") and f"{out['a']['requests'] + out['b']['requests']}request" in bar
    for m in out.values():
        assert m["requests"] >= 4 and set(m["it_by_batch"]) == {"1", "2"} and m["it"] > 0
        assert m["decode_token_p90_s"] >= m["decode_token_p50_s"] > 0 and m["amu_gb"] > 0
        assert m["energy_j"] is None or m["j_per_token"] > 0
        # the headline latencies are batch 1's (not pooled with batch 2's); each batch size's are kept
        assert m["latency_batch"] == 1 and set(m["latency_by_batch"]) == {"1", "2"}
        one, two = m["latency_by_batch"]["1"], m["latency_by_batch"]["2"]
        assert all(m[k] == one[k] for k in one if k != "requests")
        assert m["requests"] == one["requests"] + two["requests"]
        assert one["requests"] >= 2 and two["requests"] >= 2 and one["decode_token_p50_s"] != two["decode_token_p50_s"]
    with pytest.raises(ValueError, match="prompts must be at least"):
        infer.measure({"a": a}, torch.zeros(1, 4, dtype=torch.long), cfg, "cpu")


def test_harness_warms_up_on_the_full_prompt_and_a_few_tokens(monkeypatch):
    """A warm-up request runs the measured prompt but only `warmup_tokens` decode steps (each has the shapes of the
    measured ones); measured requests generate `new_tokens`."""
    seen = []
    real = infer.timed_request
    monkeypatch.setattr(infer, "timed_request", lambda m, ids, n, d: seen.append((ids.shape, n)) or real(m, ids, n, d))
    m = EffLLMForCausalLM(models.config("test")).eval()
    cfg = infer.InferConfig(prompt_len=8, new_tokens=12, batch_sizes=(1, 2), min_time_s=0.0, min_requests=2,
                            progress=False)
    infer.measure({"a": m}, torch.randint(0, 128, (2, 8)), cfg, "cpu")
    assert seen == [((1, 8), 4), ((1, 8), 12), ((1, 8), 12), ((2, 8), 4), ((2, 8), 12), ((2, 8), 12)]
    seen.clear()
    infer.measure({"a": m}, torch.randint(0, 128, (1, 8)), dataclasses.replace(cfg, batch_sizes=(1,), new_tokens=3),
                  "cpu")
    assert [n for _, n in seen] == [3, 3, 3]  # never more than a measured request


def test_harness_attributes_memory_to_each_resident_model():
    """Both models are resident while each is measured, so the process's memory cannot tell them apart; with
    attribute_memory each gets the bytes it holds plus what its requests add."""
    from effllm_utils.measure.telemetry import held_bytes

    torch.manual_seed(0)
    small = EffLLMForCausalLM(models.config("test")).eval()
    big = EffLLMForCausalLM(models.config("test", hidden_size=256, intermediate_size=1024)).eval()
    cfg = infer.InferConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), min_time_s=0.0, min_requests=2)
    prompts = torch.randint(0, 128, (1, 8))
    total = infer.measure({"small": small, "big": big}, prompts, cfg, "cpu")
    assert {m["amu_method"] for m in total.values()} == {"telemetry_total"}
    out = infer.measure({"small": small, "big": big}, prompts, cfg, "cpu", attribute_memory=True)
    for name, model in (("small", small), ("big", big)):
        m = out[name]
        assert m["amu_method"] == "held_bytes_plus_request_growth"
        assert m["held_gb"] == held_bytes(model) / 1e9
        assert m["held_gb"] <= m["amu_gb"] <= m["peak_mem_gb"] and m["amu_gb"] < m["held_gb"] + 0.05
    assert out["big"]["held_gb"] > 5 * out["small"]["held_gb"] and out["big"]["amu_gb"] > out["small"]["amu_gb"]


TASK = """task: effllm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_tasks_on_the_loaded_model(tmp_path):
    import json

    rows = [{"question": f"Q{i}", "choices": [" yes", " no"], "answer": i % 2} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tok = data.tokenizer(1024)
    m = EffLLMForCausalLM(models.config("test", vocab_size=len(tok))).eval()
    scores = quantize.evaluate_tasks(m, tok, ["effllm_local_mc"], limit=4, include_path=str(tmp_path), batch_size=2)
    assert set(scores) == {"score_effllm_local_mc", "score"} and 0.0 <= scores["score"] <= 1.0


def test_unreachable_leaderboard_task_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tok = data.tokenizer(1024)
    m = EffLLMForCausalLM(models.config("test", vocab_size=len(tok))).eval()
    with pytest.raises(data.DatasetUnavailable, match=r"lm-eval tasks \['leaderboard_musr'\] could not be loaded"):
        quantize.evaluate_tasks(m, tok, ["leaderboard_musr"], limit=2)


def test_mcr_uses_the_task_score_when_tasks_ran():
    r = {p: {"metrics": {"disk_bytes": b}, "quality": {"ppl": 9.0, "score": s}, "artifacts": {}}
         for p, b, s in [("bf16", 200, 0.40), ("int4_gptq", 60, 0.38)]}
    quantization._add_mcr(r)
    assert r["int4_gptq"]["metrics"]["mcr"] == pytest.approx(4 * 0.38 / 0.40)
    assert r["int4_gptq"]["artifacts"]["mcr_performance"] == "lm-eval score"


def test_fast_decode_in_the_harness_matches_eager_and_refuses_quantized(checkpoint, tmp_path):
    """FastDecode (the static decoder) decodes a Qwen2 checkpoint inside `measure`; int4 checkpoints decode with
    their own int4 weights, int8 (torchao) with its own int8 weights; a quantized model FastDecode cannot read is
    refused with the reason."""
    src, tok = checkpoint
    built = {p: quantize.build(p, src, tok, P, "cpu", tmp_path) for p in ("fp32", "int8", "int4_rtn")}
    decoders, paths = quantize.decode_paths(built, "static", 8 + 6 + 1)
    assert isinstance(decoders["fp32"], infer.FastDecode) and paths["fp32"] == ("static", "")
    assert isinstance(decoders["int8"], infer.FastDecode) and paths["int8"] == ("static+int8(int8pack)", "")
    int8_model = built["int8"][0]
    with pytest.raises(ValueError, match="quantized weights"):
        infer.FastDecode(int8_model, 16)
    # the int8 decoder reads torchao's integers: its greedy tokens are the torchao model's own (bf16 activations)
    ids8 = data.token_ids("validation", tok)[:8].view(1, 8)
    from effllm_utils.engine.decode import StaticDecoder

    dec = StaticDecoder(decoders["int8"].model, 1, 16, cuda_graph=False, prepared=decoders["int8"].prepared)
    assert dec.layers[0]["qkv"].kernel == "int8pack"
    with torch.no_grad():
        eager_logits = int8_model(ids8).logits[0, -1].float()
        dec.prefill(ids8[:, :7])
        step_logits = dec.step(ids8[:, 7:8], 7)[0].float()
    err = ((step_logits - eager_logits).norm() / eager_logits.norm()).item()
    assert err < 0.03, err  # the same int8 weights; bf16 activations in the kernel
    assert isinstance(decoders["int4_rtn"], infer.FastDecode) and paths["int4_rtn"] == ("static+int4(tinygemm)", "")
    ids = data.token_ids("validation", tok)[:16].view(2, 8)
    r = infer.timed_request(decoders["fp32"], ids, 6, "cpu")
    assert len(r["token_s"]) == 5 and r["tokens"] == 12 and r["e2e_s"] >= r["prefill_s"] > 0
    ref = built["fp32"][0].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 8:]
    assert torch.equal(decoders["fp32"].decoders[2].generate(ids, 6)[0], ref)
    assert decoders["fp32"].decoders[2].layers is decoders["fp32"].prepared.layers  # one fused copy per model
    # what the decoder holds: the model's weights once (its q/k/v and gate/up are views of the fused weights) and
    # the static KV cache of batch 2; an int decoder holds its integers, not the dequantized float projections
    from effllm_utils.measure.telemetry import held_bytes

    fp32, dec2 = built["fp32"][0], decoders["fp32"].decoders[2]
    cache = sum(t.numel() * t.element_size() for t in (*dec2.k, *dec2.v))
    extra = held_bytes(decoders["fp32"]) - cache - quantize.memory_bytes(fp32)
    assert 0 <= extra < 4096, extra  # + the decoder's position and token buffers
    for p in ("int8", "int4_rtn"):
        layer = decoders[p].model.model.layers[0]
        assert layer.self_attn.q_proj.weight.is_meta and layer.mlp.down_proj.weight.is_meta
        assert held_bytes(decoders[p]) < held_bytes(decoders["fp32"]) / 2
    eager, _ = quantize.decode_paths(built, "eager", 15)
    assert all(eager[p] is built[p][0] for p in built)
    with pytest.raises(ValueError, match="unknown decode \\['fast'\\]; choose from eager, static"):
        quantize.decode_paths(built, "fast", 15)


def test_gpu_profile_path_on_a_local_checkpoint(checkpoint, outputs):
    """The gpu/paper path — a Qwen2-family checkpoint by Hub id or folder, decode: static — run on a local Qwen2
    folder: float precisions decode through the static decoder, int8 through it with torchao's integers (on CPU;
    on CUDA eagerly, with the reason), and the decode path is a column of Table 9."""
    src, tok = checkpoint
    Q = dict(device="cpu", precisions=["bf16", "int8"], models={"local-qwen2": {"source": str(src)}}, vocab_size=1024,
             seq_len=64, batch_size=16, eval_batches=1, group_size=32, calibration_samples=8, calibration_len=64,
             calibration_data="embedded", one_at_a_time=True,
             prompt_len=16, new_tokens=4, decode="static", batch_sizes=[1, 2], min_time_s=0.0, min_requests=2,
             ppl_seq_len=64, ppl_windows=4, tasks=[], task_limit=0, task_include_path="", seed=0)
    recs = quantization.run_study("quantization", "gpu", Q)
    assert [(r.technique, r.status) for r in recs] == [("bf16", "ok"), ("int8", "ok")], [r.error for r in recs]
    bf16, int8 = recs
    assert bf16.artifacts["decode_path"] == "static" and int8.artifacts["decode_path"] == "static+int8(int8pack)"
    # a Hub model's perplexity: the shipped held-out text in the model's own tokenizer (tasks give the score)
    assert 1 < bf16.quality["ppl"] < 1e4 and int8.quality["ppl"] == pytest.approx(bf16.quality["ppl"], rel=0.05)
    assert bf16.metrics["decode_token_p50_s"] > 0 and set(bf16.metrics) >= {"it", "al_s", "prefill_s", "memory_bytes"}
    assert bf16.artifacts["resident"] == "one at a time"  # the gpu/paper way: each built, measured, freed
    assert bf16.artifacts["base"]["calibration"].startswith("embedded training split")
    for r in recs:  # each precision's own memory, not the process holding both
        assert r.artifacts["amu_method"] == "held_bytes_plus_request_growth"
        assert r.metrics["amu_gb"] >= r.metrics["held_gb"] > 0 and "amu_method" not in r.metrics
    assert bf16.metrics["held_gb"] > bf16.metrics["memory_bytes"] / 1e9  # static: + fused copies and the KV cache
    t = views.quantization_table("gpu")
    assert list(t["decode path"]) == ["static", "static+int8(int8pack)"] and list(t["latency at batch"]) == [1, 1]
    assert {p.name for p in views.quantization_figures("gpu")} >= {"quantization.csv", "quantization_local-qwen2.png"}
    assert bf16.artifacts["latency_by_batch"].keys() == {"1", "2"} and "latency_by_batch" not in bf16.metrics
    with pytest.raises(ValueError, match="unknown decode \\['graph'\\]; choose from eager, static"):
        quantization.run_study("quantization", "gpu", Q | {"decode": "graph"})


def test_gptq_checkpoint_read_without_gptq_kernels_matches_gptqmodel(checkpoint, tmp_path):
    """decode.from_gptq reads GPTQModel's saved int4 checkpoint straight from safetensors into tinygemm's layout:
    the backbone (dequantized weights) gives GPTQModel's logits, and the int4 decoder's steps give the backbone's."""
    from gptqmodel import GPTQModel

    from effllm_utils.engine import decode

    src, tok = checkpoint
    _, info = quantize.build("int4_gptq", src, tok, P, "cpu", tmp_path)
    from safetensors import safe_open

    with safe_open(Path(info["path"]) / "model.safetensors", "pt") as f:  # calibrated in fp32, stored as a bf16 load
        dtypes = {k.rsplit(".", 1)[-1]: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes["weight"] == "BF16" and dtypes["scales"] == "F16" and dtypes["qweight"] == "I32", dtypes
    ref = GPTQModel.load(info["path"], device="cpu").model
    ours, q4 = decode.from_gptq(info["path"])
    ids = data.token_ids("validation", tok)[:24].view(2, 12)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.float(), ours(input_ids=ids, use_cache=False).logits.float()
    assert ((a - b).norm() / a.norm()).item() < 0.02 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    dec = decode.StaticDecoder(ours, 2, 32, int4_weights=q4)
    assert dec.lm_head.int4 is False and dec.layers[0]["qkv"].int4  # GPTQ left lm_head in floating point
    tokens, _ = dec.generate(ids, 6)
    with torch.no_grad():
        full = ours(torch.cat([ids, tokens], 1), use_cache=False).logits[:, 11:17].float()
        dec.prefill(ids)
        steps = torch.stack([dec.step(tokens[:, i:i + 1], 12 + i).float() for i in range(5)], 1)
    assert ((steps - full[:, 1:6]).norm() / full.norm()).item() < 0.02
    assert torch.equal(tokens[:, 0], full[:, 0].argmax(-1))
    cfg = (Path(info["path"]) / "quantize_config.json")
    cfg.write_text(cfg.read_text().replace('"desc_act": false', '"desc_act": true'))
    with pytest.raises(ValueError, match="only 4-bit GPTQ without act-order maps onto tinygemm"):
        decode.read_gptq(info["path"])


def test_calibration_text_from_a_dataset_or_the_shipped_text_declared(checkpoint, monkeypatch):
    """GPTQ's calibration windows: in-distribution text from a Hub dataset where reachable (the token cache's
    windows, decoded), else the shipped training split, with the reason in the records."""
    from effllm_utils.studies.quantization import calibration

    _, tok = checkpoint
    Q = P | {"calibration_samples": 3, "calibration_len": 16}
    texts, source = calibration(tok, Q | {"calibration_data": "embedded"})
    assert len(texts) == 3 and source == "embedded training split (Shakespeare/Milton)"

    def offline(key, tok, n, **kw):
        raise data.DatasetUnavailable(f"dataset {key!r} could not be loaded (offline)")

    monkeypatch.setattr(data, "hub_token_ids", offline)
    texts2, source = calibration(tok, Q | {"calibration_data": "fineweb_edu"})
    assert texts2 == texts and source.startswith("embedded training split (fineweb_edu unreachable: dataset")
    ids = torch.arange(100, 100 + 48)
    monkeypatch.setattr(data, "hub_token_ids", lambda key, tok, n, **kw: ids[:n])
    texts3, source = calibration(tok, Q | {"calibration_data": "fineweb_edu"})
    assert texts3 == [tok.decode(ids[i * 16:(i + 1) * 16]) for i in range(3)] and source.startswith("fineweb_edu")
