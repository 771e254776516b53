"""One training loop for pretraining and fine-tuning, on `accelerate`.

    result = train(model, train_ids, val_ids, TrainConfig(steps=200, batch_size=16, seq_len=256))
    result["metrics"]   # al_s, tokens_per_s, tt, amu_gb, aec_w, pcu, mfu_pct, ... (telemetry over the timed steps)
    result["quality"]   # loss, ppl (validation)
    result["artifacts"] # loss and validation curves, per-step times

AdamW (fused on GPU), linear warm-up + cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
optional torch.compile, periodic validation perplexity, a non-finite loss stops the run (`TrainingDiverged`, which
runs.execute records as a failed run), safetensors checkpoints, and a telemetry Monitor around the timed steps
(the first `skip_steps` — compilation, allocator warm-up — are excluded). Memory: on GPU NVML's device memory used;
on CPU the run's own — the bytes the model and the optimizer state hold plus what the timed steps add above the
window's start (`amu_method` "held_bytes_plus_window_growth"; the process's RSS is kept as `rss_amu_gb`).

It runs unchanged under `torchrun` / `accelerate launch` with several processes: the global batch (batch_size x
grad_accum x processes is NOT what is fixed — `batch_size` is the GLOBAL micro-batch) is split across ranks, so one
process and N processes see the same samples per step and give the same loss.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from effllm_utils.measure import metrics
from effllm_utils.measure.telemetry import Monitor, held_bytes, own_memory, trim_heap


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch, GLOBAL (split across processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50  # steps between validation passes (and one at the end)
    eval_batches: int = 8
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool | str = False  # True: inductor's default; or a torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    seed: int = 0
    skip_steps: int = 2  # steps excluded from the timed telemetry window
    telemetry_period_s: float = 0.1
    log_every: int = 10  # steps between the progress bar's loss / tokens-per-second updates
    progress: bool = True  # a progress bar per run (steps, loss, tokens/s, ETA; rank 0), updated between steps
    progress_desc: str = "train"  # the bar's label (the studies give the technique)

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be true/false or one of {', '.join(COMPILE_MODES)}, not {self.compile!r}")
        if self.steps <= self.skip_steps:
            raise ValueError(f"steps ({self.steps}) must exceed skip_steps ({self.skip_steps}) to time anything")
        self.betas = tuple(self.betas)

    @classmethod
    def params_of(cls, P: dict[str, Any]) -> dict[str, Any]:
        """The study params that are fields of this config: what a run's identity (its record's params) and its
        training config share, taken from one place."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in P.items() if k in names}

    @classmethod
    def from_params(cls, P: dict[str, Any], **overrides) -> "TrainConfig":
        """The training config of a study's params (`params_of`), with `overrides` (a method's own lr, ...)."""
        return cls(**(cls.params_of(P) | overrides))


def compiled(model, how: bool | str):
    """`model` under torch.compile (how: True for inductor's default, or a mode name), or as it is (False)."""
    if not how:
        return model
    return torch.compile(model, mode=None if how is True else how)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, seq_len] int64 windows (the stream may be a memory-mapped int32 file: only these pages are read)."""
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()]).long()


class Data:
    """Training or validation data: a flat token stream (language modelling on random windows) or a set of
    examples {"input_ids": [N, L], "labels": [N, L]} (supervised fine-tuning; labels -100 where no loss is taken,
    e.g. the prompt and the padding). Examples may carry further per-example tensors [N, ...] (e.g. "pixel_values"
    of a vision-language model), passed to the model as keyword arguments of the same name."""

    def __init__(self, data, seq_len: int, name: str):
        self.examples = isinstance(data, dict)
        if self.examples:
            self.ids, self.labels = data["input_ids"], data["labels"]
            self.extra = {k: v for k, v in data.items() if k not in ("input_ids", "labels")}
            tokens = not self.ids.is_floating_point()  # token examples: [N, L] ids with [N, L] labels (SFT)
            if (tokens and (self.ids.shape != self.labels.shape or self.ids.ndim != 2)) \
                    or self.ids.shape[0] != self.labels.shape[0]:
                raise ValueError(f"{name}: input_ids and labels must both be [N, L] (or, for non-token inputs such as "
                                 f"images, share N), got {tuple(self.ids.shape)} and {tuple(self.labels.shape)}")
            self.n = self.ids.shape[0]
            bad = [k for k, v in self.extra.items() if not torch.is_tensor(v) or v.shape[0] != self.n]
            if bad:
                raise ValueError(f"{name}: {bad} must be tensors with one row per example ({self.n})")
            if self.n == 0:
                raise ValueError(f"{name}: no examples (is seq_len {seq_len} shorter than the prompt template?)")
        else:
            self.ids, self.n, self.extra = data, len(data), {}
            if self.n <= seq_len + 1:
                raise ValueError(f"seq_len {seq_len} is longer than the {name} data ({self.n} tokens)")
        self.seq_len = seq_len

    def batch(self, picks: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for these examples (or windows), on `device`."""
        if self.examples:
            out = {"input_ids": self.ids[picks], "labels": self.labels[picks]} | {
                k: v[picks] for k, v in self.extra.items()}
        else:
            x = _windows(self.ids, picks, self.seq_len)
            out = {"input_ids": x, "labels": x}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def train_picks(self, batch: int, step: int, micro: int, seed: int) -> torch.Tensor:
        """The global micro-batch `micro` of `step`: a pure function of its arguments, so every process agrees on the
        global batch and a re-run sees the same data."""
        high = self.n if self.examples else self.n - self.seq_len - 1
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)
        return torch.randint(0, high, (batch,), generator=g)

    def eval_picks(self, count: int) -> torch.Tensor:
        """Evenly spaced validation windows or examples (deterministic, covering the split)."""
        high = self.n - 1 if self.examples else self.n - self.seq_len - 1
        return torch.linspace(0, high, count).long()


def _optimizer(model, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (fused on CUDA)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                             fused=device.type == "cuda")


class _Loop:
    """The state of one training run: data, optimizer, schedule, the loss curve and the step times.

    On CUDA the host does not wait for step s before queueing step s+1: each step's loss is copied to pinned memory
    behind an event and read (and checked) one step later, and step times are CUDA-event intervals (GPU time from the
    end of one step to the end of the next). On CPU everything is synchronous and timed by the host clock."""

    def __init__(self, model, train_ids, val_ids, cfg: TrainConfig, acc, optimizer):
        self.cfg, self.acc, self.device = cfg, acc, acc.device
        self.cuda = self.device.type == "cuda"
        self.use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.cuda)
        self.world, self.rank = acc.num_processes, acc.process_index
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {self.world}")
        self.train_data, self.val_data = Data(train_ids, cfg.seq_len, "train"), Data(val_ids, cfg.seq_len, "validation")
        torch.manual_seed(cfg.seed)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = optimizer or _optimizer(model, cfg, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        self.model, self.opt = acc.prepare(model, opt)
        self.step_fn = compiled(self.model, cfg.compile)
        self.local = cfg.batch_size // self.world
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        self.mon = Monitor(period_s=cfg.telemetry_period_s, device=str(self.device) if self.cuda else "cpu")
        self.curve, self.val_curve, self.step_times = [], [], []
        self.last_end = None  # CUDA: the event that ended the previous step
        self.pending = None  # CUDA: (step, pinned loss, end event) of the step queued but not yet read

    def _mine(self, picks: torch.Tensor) -> torch.Tensor:
        return picks[self.rank * self.local:(self.rank + 1) * self.local]

    def evaluate(self) -> float:
        cfg = self.cfg
        self.model.eval()
        picks = self.val_data.eval_picks(cfg.eval_batches * cfg.batch_size)
        losses = []
        with torch.no_grad():
            for b in range(cfg.eval_batches):
                batch = self.val_data.batch(self._mine(picks[b * cfg.batch_size:(b + 1) * cfg.batch_size]), self.device)
                with self.autocast:
                    losses.append(self.step_fn(**batch, use_cache=False).loss.float())
        self.model.train()
        return self.acc.reduce(torch.stack(losses).mean(), reduction="mean").item()

    def record_loss(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            if self.mon._thread is not None:
                self.mon.stop()
            raise TrainingDiverged(f"loss became {value} at step {step} (lr {self.sched.get_last_lr()[0]:.2e}); "
                                   f"lower the learning rate or enable gradient clipping")
        self.curve.append(value)

    def settle(self) -> None:
        """Read the queued CUDA step's loss and time (no-op when none is queued)."""
        if self.pending is None:
            return
        step, buf, end = self.pending
        end.synchronize()
        self.step_times.append(self.last_end.elapsed_time(end) / 1e3)
        self.last_end, self.pending = end, None
        self.record_loss(step, buf.item())

    def mark(self) -> None:
        """CUDA: start the next step's interval now (after a validation pass, which is not part of its time)."""
        if self.cuda:
            self.last_end = torch.cuda.Event(enable_timing=True)
            self.last_end.record()

    def step(self, step: int) -> None:
        """One optimizer step over `grad_accum` micro-batches; its loss is recorded (on CUDA one step later)."""
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            picks = self.train_data.train_picks(cfg.batch_size, step, micro, cfg.seed)
            batch = self.train_data.batch(self._mine(picks), self.device)
            with self.autocast:
                loss = self.step_fn(**batch, use_cache=False).loss / cfg.grad_accum
            acc.backward(loss)
            total += loss.detach()
        if cfg.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        reduced = acc.reduce(total, reduction="mean")
        if self.cuda:
            buf = torch.empty((), pin_memory=True)
            buf.copy_(reduced, non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.settle()
            self.pending = (step, buf, end)
        else:
            value = reduced.item()
            self.step_times.append(time.perf_counter() - t0)
            self.record_loss(step, value)

    def run(self) -> dict[str, Any]:
        """All steps, with the telemetry window after `skip_steps` and periodic validation; the Monitor's result."""
        from effllm_utils.core import progress

        cfg = self.cfg
        bar = progress.bar(total=cfg.steps, desc=cfg.progress_desc, unit="step",
                           disable=not cfg.progress or self.rank != 0, mininterval=1.0)
        try:
            return self._steps(bar)
        finally:
            bar.close()

    def _progress(self, bar, step: int) -> None:
        """Advance the bar after a step (between steps: outside every step's timed interval); every `log_every`
        steps show the latest loss and the tokens/s of the steps timed so far."""
        bar.update(1)
        if (step + 1) % self.cfg.log_every == 0 and self.curve:
            cfg = self.cfg
            rate = cfg.batch_size * cfg.grad_accum * cfg.seq_len * len(self.step_times) / max(sum(self.step_times),
                                                                                             1e-9)
            bar.set_postfix(loss=f"{self.curve[-1]:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            # the trackers (accelerate: no-op without any): the loss of the latest step read, lr, tokens/s
            self.acc.log({"train/loss": self.curve[-1], "train/lr": self.sched.get_last_lr()[0],
                          "train/tokens_per_s": rate}, step=len(self.curve))

    def _steps(self, bar) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        self.mark()
        for step in range(cfg.steps):
            if step == cfg.skip_steps:
                self.settle()
                if not self.cuda:
                    trim_heap()  # free heap pages back to the OS, so the window's RSS growth is the steps' memory
                self.mon.start()
            self.step(step)
            self._progress(bar, step)
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                self.settle()
                self.val_curve.append((step + 1, self.evaluate()))
                self.acc.log({"val/loss": self.val_curve[-1][1]}, step=step + 1)
                self.mark()
        self.settle()
        telem = self.mon.stop()
        if not self.cuda:  # the run's own memory; RSS also holds the interpreter, libraries and lazily imported code
            telem.update(own_memory(held_bytes(self.model, self.opt), telem["amu_growth_gb"],
                                    telem["peak_growth_gb"], "held_bytes_plus_window_growth"))
        return telem


def _metrics(loop: _Loop, telem: dict, flops_per_token: float | None, peak_flops: float | None) -> tuple[dict, dict]:
    """The run's metrics over its timed steps, and notes (a PCU above 1 warns that the peak is understated)."""
    cfg, world = loop.cfg, loop.world
    timed = loop.step_times[cfg.skip_steps:]
    seconds = sum(timed)
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len * len(timed)
    fpt = flops_per_token if flops_per_token is not None else 6.0 * loop.n_params
    budget = cfg.batch_size * cfg.grad_accum * cfg.seq_len * cfg.steps  # every step, the untimed ones too
    m = {
        "params": loop.n_params, "trainable_params": loop.n_trainable,
        "tokens_seen": budget, "tokens_per_param": budget / loop.n_params,
        **metrics.latency(timed), "tokens_per_s": tokens / seconds, "tt": metrics.tt(tokens, loop.n_params, seconds),
        "samples_per_s": cfg.batch_size * cfg.grad_accum * len(timed) / seconds,
        "flops_per_token": fpt, "amu_gb": telem["amu_gb"], "amu_frac": telem["amu_frac"],
        "rss_amu_gb": telem["rss_amu_gb"], "held_gb": telem.get("held_gb"),
        "peak_mem_gb": telem["peak_mem_gb"], "gpu_util_pct": telem["gpu_util_pct"], "aec_w": telem["aec_w"],
        "energy_j": telem["energy_j"], "j_per_token": telem["energy_j"] / tokens if telem["energy_j"] else None,
        "processes": world, "precision": "bf16" if loop.use_bf16 else "fp32",
    }
    notes = {}
    if peak_flops:
        m["pcu"] = metrics.pcu(fpt * tokens / world, seconds, peak_flops)  # per device
        m["mfu_pct"] = 100 * m["pcu"]
        if m["pcu"] > 1:  # more than the peak: the peak is wrong (e.g. a hardware-study run in a slow spell)
            notes["pcu_warning"] = (f"achieved {m['pcu'] * peak_flops:.3g} FLOP/s per device exceeds the peak given "
                                    f"({peak_flops:.3g}): the peak is understated; re-run the hardware study "
                                    f"(make reproduce ARGS='--only hardware --force') and this run")
            warnings.warn(notes["pcu_warning"], stacklevel=3)
    return m, notes


def train(model, train_ids, val_ids, cfg: TrainConfig, flops_per_token: float | None = None,
          peak_flops: float | None = None, checkpoint_dir: str | Path | None = None,
          accelerator=None, optimizer=None, tracking=None) -> dict[str, Any]:
    """Train `model` (any causal LM taking input_ids and labels) and measure it. See the module docstring.

    train_ids / val_ids: a flat token tensor, or {"input_ids", "labels"} examples (see `Data`; images with class
    labels train a DiT this way, with seq_len = patches per image for the throughput metrics).
    flops_per_token: analytic training FLOPs per token (default 6 x parameters); peak_flops: device peak FLOP/s
    for PCU/MFU (None: not reported). optimizer: a ready optimizer over the model's parameters (e.g. LoRA+'s
    param groups); default AdamW with weight decay on matrices only. tracking: an `engine.tracking.Tracking`
    (TensorBoard and the other accelerate trackers: params, loss, validation loss, final metrics)."""
    from accelerate import Accelerator

    from effllm_utils.engine import tracking as tracks

    # cpu=True is how accelerate picks the gloo backend for several CPU processes under torchrun
    acc = accelerator or Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(),
                                     **tracks.accelerator_kwargs(tracking))
    tracks.start(acc, tracking)
    loop = _Loop(model, train_ids, val_ids, cfg, acc, optimizer)
    telem = loop.run()
    val_loss = loop.evaluate()
    loop.val_curve.append((cfg.steps, val_loss))
    m, notes = _metrics(loop, telem, flops_per_token, peak_flops)
    if tracking is not None and tracking.trackers:
        acc.log({"val/loss": val_loss, **tracks.final_metrics(m)}, step=cfg.steps)
        acc.end_training()
    if checkpoint_dir is not None and acc.is_main_process:
        acc.unwrap_model(loop.model).save_pretrained(checkpoint_dir, safe_serialization=True)
    curve = loop.curve
    return {"metrics": m, "quality": {"loss": val_loss, "ppl": math.exp(min(val_loss, 50.0)),
                                      "train_loss": sum(curve[-5:]) / len(curve[-5:])},
            "artifacts": {"loss_curve": curve, "val_curve": loop.val_curve, "step_s": loop.step_times,
                          "energy_method": telem["energy_method"], "energy_reason": telem["energy_reason"],
                          "amu_method": telem.get("amu_method"),
                          "telemetry_errors": telem["errors"], **notes}}
