"""The fine-tuning methods against what they promise, and the study end to end on a micro configuration."""
import pytest
import torch

from effllm_utils import data, models
from effllm_utils.engine import adapters, suite
from effllm_utils.engine.train import TrainConfig, train
from effllm_utils.models import EffLLMForCausalLM
from effllm_utils.report import views
from effllm_utils.studies import finetuning, quantization

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
P = dict(rank=4, alpha=8, target_modules=TARGETS, freeze_fraction=0.5, loraplus_lr_ratio=16.0, pissa_init="pissa",
         lr_full=1e-3, lr_adapter=3e-3)
IDS = (torch.arange(6_000) * 7 + torch.arange(6_000) // 97) % 128
CFG = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=100, eval_batches=1)


def base():
    torch.manual_seed(0)
    return EffLLMForCausalLM(models.config("test")).eval()


def logits(model, x=IDS[:32].view(2, 16)):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "pissa", "lora_plus"])
def test_merged_adapters_give_the_unmerged_outputs(method):
    model, opt, _ = adapters.apply_method(base(), method, P)
    train(model, IDS[:5000], IDS[5000:], CFG, optimizer=opt)  # move B away from zero
    model.eval()
    before = logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), before, atol=1e-4, rtol=1e-4)


def test_pissa_at_initialisation_reproduces_the_base_model():
    ref = logits(base())
    model, _, _ = adapters.apply_method(base(), "pissa", P)
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=1e-4)
    a = model.base_model.model.model.layers[0].self_attn.q_proj
    assert a.lora_A["default"].weight.abs().sum() > 0 and a.lora_B["default"].weight.abs().sum() > 0  # not LoRA's 0


def test_freeze_leaves_frozen_weights_bit_identical():
    model, _, info = adapters.apply_method(base(), "freeze", P)
    assert info == {"frozen_layers": 1, "total_layers": 2}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("layers.0." in n for n in frozen) and "model.embed_tokens.weight" in frozen
    assert any("layers.1." in n for n in trained) and "lm_head.weight" in trained
    train(model, IDS[:5000], IDS[5000:], CFG)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert any(not torch.equal(after[n], p) for n, p in trained.items())


def test_lora_plus_gives_b_a_larger_learning_rate_than_a():
    model, opt, info = adapters.apply_method(base(), "lora_plus", P)
    ids = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            kind = "B" if "lora_B" in ids[id(p)] else "A" if "lora_A" in ids[id(p)] else "other"
            lrs.setdefault(kind, set()).add(group["lr"])
    assert lrs["A"] == {3e-3} and lrs["B"] == {3e-3 * 16.0} and info["loraplus_lr_ratio"] == 16.0


def test_rslora_and_dora_are_what_peft_builds():
    lora, _, _ = adapters.apply_method(base(), "rslora", P)
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # alpha / sqrt(r)
    dora, _, _ = adapters.apply_method(base(), "dora", P)
    assert "default" in dora.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector


def test_unknown_method_and_absent_target_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown fine-tuning method 'qlora2'; choose one of full, freeze"):
        adapters.apply_method(base(), "qlora2", P)
    with pytest.raises(ValueError, match=r"target module\(s\) \['c_attn'\] not found in EffLLMForCausalLM; its "
                                         r"linear layers are \['down_proj', 'gate_proj'"):
        adapters.apply_method(base(), "lora", P | {"target_modules": ["q_proj", "c_attn"]})


def test_flops_accounting():
    assert adapters.finetune_flops_per_token(100, 100, 100) == 600  # full fine-tuning: 6N
    assert adapters.finetune_flops_per_token(100, 2, 100) == 404  # LoRA: 4N + 2 x adapters


def test_dialogue_sft_examples_mask_the_prompt():
    tok = data.tokenizer(1024)
    pairs = data.dialogue_pairs("validation")
    assert len(pairs) > 500 and all(i.endswith(".") and r for i, r in pairs[:50])
    ex = data.sft_examples(pairs[:20], tok, 96)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.shape == labels.shape and ids.shape[1] == 96
    row = labels[0]
    first = int((row != -100).nonzero()[0])
    prompt = tok.decode(ids[0, :first])
    assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
    short = data.sft_examples(pairs[:20], tok, 32)  # long instructions are cut from the left, responses kept
    assert len(short["input_ids"]) == 20 and ((short["labels"] != -100).sum(1) >= 1).all()
    for ids_row, label_row in zip(short["input_ids"], short["labels"]):
        cut = tok.decode(ids_row[: int((label_row != -100).nonzero()[0])])
        assert cut.startswith("### Instruction:\n") and cut.endswith("### Response:\n")
    assert torch.equal(row[row != -100], ids[0][row != -100])


def test_study_end_to_end_with_cached_base_model(outputs):
    dims = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64}
    params = P | dict(device="auto", methods=["full", "lora", "freeze"], datasets=["milton", "dialogue"],
                      models={"micro": {"source": "suite", "dims": dims, "pretrain_steps": 4, "pretrain_lr": 0.003}},
                      vocab_size=512, hub_examples=10, steps=3, batch_size=4, grad_accum=1, seq_len=32,
                      warmup_steps=1, eval_every=100, eval_batches=1, precision="auto", compile=False, seed=0)
    recs = finetuning.run_study("peft", "tiny", params)
    assert [(r.params["dataset"], r.technique, r.status) for r in recs] == [
        ("milton", "full", "ok"), ("milton", "lora", "ok"), ("milton", "freeze", "ok"),
        ("dialogue", "full", "ok"), ("dialogue", "lora", "ok"), ("dialogue", "freeze", "ok")], [r.error for r in recs]
    # the weights' dtype is in each run's identity (a bf16 run on GPU never reuses an fp32 record), and said
    assert {(r.params["weights_dtype"], r.artifacts["weights_dtype"]) for r in recs} == {("float32", "float32")}
    ckpts = list((outputs / "tiny" / "checkpoints" / "base").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "model.safetensors").is_file()  # one base model for every run
    full, lora = recs[0].metrics, recs[1].metrics
    assert full["trainable_params"] == full["base_params"] > 10 * lora["trainable_params"]
    assert lora["st"] == pytest.approx(lora["samples_per_s"] / lora["base_params"])
    t = views.peft_table("tiny")
    assert list(t.columns[:3]) == ["model", "dataset", "method"] and t["efficiency score"].between(0, 1).all()
    names = {p.name for p in views.peft_figures("tiny")}
    assert {"peft.csv", "peft_micro_milton.png", "peft_micro_dialogue.pdf"} <= names
    with pytest.raises(ValueError, match=r"unknown fine-tuning method\(s\) \['adalora'\]; choose from full"):
        finetuning.run_study("peft", "tiny", params | {"methods": ["adalora"]})


def test_one_pretrained_base_per_recipe_whatever_the_models_name(outputs, monkeypatch):
    dims = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64}
    spec = {"source": "suite", "dims": dims, "pretrain_steps": 3, "pretrain_lr": 0.003}
    params = dict(vocab_size=512, seq_len=32, batch_size=2, eval_batches=1)
    _, _, a = suite.load_base("tiny", "tiny-base", spec, params, "cpu")

    def no_training(*args, **kwargs):
        raise AssertionError("the same recipe was pretrained twice")

    monkeypatch.setattr("effllm_utils.engine.train.train", no_training)
    _, _, b = suite.load_base("tiny", "tiny-vlm", spec, params, "cpu")  # another study's name, the same recipe
    assert a["checkpoint"] == b["checkpoint"] and a["pretrain"] == b["pretrain"]
    with pytest.raises(AssertionError, match="pretrained twice"):  # a different recipe is a different checkpoint
        suite.load_base("tiny", "tiny-base", spec | {"pretrain_steps": 4}, params, "cpu")
    monkeypatch.setattr("effllm_utils.core.provenance.builder_version", lambda *modules: "0ther0de")
    with pytest.raises(AssertionError, match="pretrained twice"):  # so is the same recipe built by other code
        suite.load_base("tiny", "tiny-base", spec, params, "cpu")


def test_hub_model_offline_is_a_failed_record_with_one_clear_line(outputs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    params = P | dict(device="auto", methods=["lora"], datasets=["openo1_sft"], vocab_size=512, hub_examples=10,
                      models={"Qwen2.5-0.5B": {"source": "Qwen/Qwen2.5-0.5B"}}, steps=3, batch_size=4,
                      grad_accum=1, seq_len=32, warmup_steps=1, eval_every=100, eval_batches=1, precision="auto",
                      compile=False, seed=0)
    rec = finetuning.run_study("peft", "tiny", params)[0]
    assert rec.status == "failed" and rec.error.startswith("ModelUnavailable: model 'Qwen/Qwen2.5-0.5B' could not")


def _head_model(W, g, bias=False):
    """A stand-in causal LM: output head W [vocab, d] after a final RMSNorm with weight g (a LayerNorm, with its
    bias, if asked)."""
    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(len(g)) if bias else torch.nn.RMSNorm(len(g))
            self.norm.weight.data = g.clone()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = Decoder(), torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            self.head.weight.data = W.clone()

        def get_decoder(self):
            return self.decoder

        def get_output_embeddings(self):
            return self.head

    return LM()


def test_frozen_head_floor_matches_the_closed_form():
    """Three unit rows 120 degrees apart in 2-D, g = 1: the best normalised input for token 0 is its own row at norm
    sqrt(2), so the lowest NLL is log(1 + 2 exp(-1.5 sqrt(2))); scaling g by 10 drives it to ~0."""
    import math

    from effllm_utils.engine.adapters import frozen_head_floor

    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    W = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([[-100, 0, 0, 1, -100]])  # tokens 0, 0, 1 carry the loss (position 0 is never predicted)
    exact = math.log(1 + 2 * math.exp(-1.5 * math.sqrt(2)))
    floor, why = frozen_head_floor(_head_model(W, torch.ones(2)), labels)
    assert why is None and floor == pytest.approx(exact, abs=1e-4)  # all three tokens are symmetric
    assert frozen_head_floor(_head_model(W, 10 * torch.ones(2)), labels)[0] < 1e-6
    assert frozen_head_floor(_head_model(W, torch.ones(2), bias=True), labels) == \
        (None, "the final norm is not an RMSNorm (weight only) followed by the output head")


@pytest.mark.parametrize("spec, vlm, message", [
    ({"source": "suite", "dims": {}, "pretrain_stpes": 3, "pretrain_lr": 0.01}, False,
     r"models\['m'\]: unknown suite-model key 'pretrain_stpes' \(did you mean 'pretrain_steps'\?\)"),
    ({"source": "suite", "dims": {}, "pretrain_lr": 0.01}, False, r"models\['m'\]: a suite model needs pretrain_steps"),
    ({"source": "suite", "dims": {"hiden_size": 64}, "pretrain_steps": 3, "pretrain_lr": 0.01}, False,
     r"models\['m'\]\['dims'\]: unknown config key 'hiden_size'"),
    ({"source": "Qwen/Qwen2.5-0.5B", "pretrain_steps": 3}, False,
     r"models\['m'\]: unknown Hub-model key 'pretrain_steps'"),
    ({"dims": {}}, False, r"models\['m'\]: needs a 'source'"),
    ({"source": "suite", "dims": {}, "pretrain_steps": 3, "pretrain_lr": 0.01}, True,
     r"a suite model needs pretrain_seq_len, pretrain_batch_size, encoder, encoder_steps"),
    ({"source": "suite", "dims": {}, "pretrain_steps": 3, "pretrain_lr": 0.01, "pretrain_seq_len": 32,
      "pretrain_batch_size": 4, "encoder": {"hiden_size": 32}, "encoder_steps": 3, "encoder_lr": 0.01,
      "align_steps": 3, "align_lr": 0.01}, True,
     r"models\['m'\]\['encoder'\]: unknown CLIPVisionConfig field 'hiden_size' \(did you mean 'hidden_size'\?\)"),
])
def test_model_specs_are_checked_before_any_run(outputs, spec, vlm, message):
    with pytest.raises(ValueError, match=message):
        suite.check_model_specs({"m": spec}, vlm=vlm)


def test_the_shipped_model_specs_pass_and_a_bad_one_stops_the_study(outputs):
    from effllm_utils.core import params

    for profile in ("tiny", "small", "gpu", "paper"):
        for study in ("peft", "quantization", "vlm"):
            P = params.effective(study, params.study_params(study, profile))
            suite.check_model_specs(P["models"], vlm=study == "vlm")
    P = params.effective("quantization", params.study_params("quantization", "tiny"))
    suite_spec = params.effective("peft", params.study_params("peft", "tiny"))["models"]["tiny-base"]
    bad = {"tiny-base": suite_spec | {"pretrain_step": 5}}  # the suite's backbone, as quantization can add it
    with pytest.raises(ValueError, match="unknown suite-model key 'pretrain_step'"):
        quantization.run_study("quantization", "tiny", P | {"models": bad})
    assert not (outputs / "tiny" / "checkpoints").exists()  # nothing was pretrained


def test_adapter_methods_hold_their_frozen_base_in_bf16_on_gpu_only():
    import torch

    from effllm_utils.studies.finetuning import weights_dtype

    for method in ("lora", "lora_plus", "rslora", "dora", "pissa"):
        assert weights_dtype(method, "cuda", "auto") == torch.bfloat16 == weights_dtype(method, "cuda:1", "bf16")
        assert weights_dtype(method, "cpu", "auto") == torch.float32 == weights_dtype(method, "cuda", "fp32")
    assert weights_dtype("full", "cuda", "auto") == weights_dtype("freeze", "cuda", "bf16") == torch.float32
