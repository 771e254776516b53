"""docs/adding-a-technique.md, as a test: a new attention variant defined in this file only reaches the records, the
study's table and figures, and the claims check, without editing any other file."""
import torch
from torch import nn

from effllm_utils.models.modeling import Attention, register_attention
from effllm_utils.report import claims, views
from effllm_utils.studies import registry

DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
P = dict(device="auto", scales={"micro": DIMS}, vocab_size=512, dataset="embedded", tokenizer="embedded",
         train_tokens=0, data_files="", steps=4, batch_size=4, grad_accum=1, seq_len=32, lr=0.003, warmup_steps=1,
         eval_every=1000, eval_batches=1, precision="auto", compile=False, seed=0, save_checkpoints=False,
         techniques={"gqa": {"attention": "gqa"}, "gated": {"attention": "gated_gqa"}})


class GatedGQA(Attention):
    """Step 1 of the doc: the variant. GQA whose output passes a learned per-head gate (initialised open)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.head_gate = nn.Parameter(torch.ones(config.num_attention_heads))

    def forward(self, x, positions, rope, allowed, bias, cache):
        out = super().forward(x, positions, rope, allowed, bias, cache)
        B, T, _ = out.shape
        return (out.view(B, T, len(self.head_gate), -1) * self.head_gate[:, None]).view(B, T, -1)


def test_a_new_attention_variant_reaches_records_table_figures_and_claims(outputs, tmp_path):
    register_attention("gated_gqa", GatedGQA)  # step 2: its config name
    # step 3: a technique is a config value in the study's params (here passed directly; a params file or --set
    # techniques=... does the same)
    recs = registry.run("attention", "tiny", P)
    assert [(r.technique, r.status) for r in recs] == [("gqa", "ok"), ("gated", "ok")], [r.error for r in recs]
    gated = recs[1]
    assert gated.artifacts["model_config"]["attention"] == "gated_gqa" and gated.quality["ppl"] > 1
    assert gated.metrics["params"] == recs[0].metrics["params"] + 2 * 4  # the gates: 4 heads x 2 layers
    # step 4: the study's table and figures show it, from the records alone
    table = views.pretraining_table("tiny", "attention")
    assert list(table["technique"]) == ["gated", "gqa"]
    assert {"attention.csv", "attention_micro.png"} <= {p.name for p in views.pretraining_figures("tiny", "attention")}
    # step 5: a claim about it (a claims file of your own, or reference/claims.yaml) is checked like the paper's
    path = tmp_path / "claims.yaml"
    path.write_text("claims:\n  - id: gated_not_worse\n    claim: gating heads keeps perplexity\n"
                    "    source: this test\n    study: attention\n    tests:\n"
                    "      - {kind: less, a: gated, b: gqa, metric: ppl}\n")
    checked = claims.evaluate("tiny", claims.load_claims(path))
    row = checked.set_index("id").loc["gated_not_worse"]
    assert row["group"] == "micro" and "gated" in row["evidence"] and row["verdict"]
