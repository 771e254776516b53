"""Train the test backbone for a few steps and write the loss curve; run once plainly and once under torchrun."""
import json
import sys

import torch

from effllm_utils import models
from effllm_utils.engine.train import TrainConfig, train

torch.manual_seed(0)
model = models.EffLLMForCausalLM(models.config("test", ffn=sys.argv[2] if len(sys.argv) > 2 else "dense"))
ids = torch.randint(0, 128, (20_000,), generator=torch.Generator().manual_seed(1))
result = train(model, ids[:16_000], ids[16_000:], TrainConfig(steps=6, batch_size=8, grad_accum=2, seq_len=32,
                                                                lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
                                                                telemetry_period_s=0.05))
if int(__import__("os").environ.get("RANK", "0")) == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"loss": result["artifacts"]["loss_curve"], "val": result["quality"]["loss"],
                   "processes": result["metrics"]["processes"]}, f)
