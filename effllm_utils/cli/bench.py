"""`make bench`: training-step throughput and MFU of the backbone beside transformers' Qwen2 at the same shape,
and (`--mode decode`) batch-1 decode speed as a fraction of the memory-bandwidth roofline.

    python -m effllm_utils.cli.bench                 # the gpu profile's shape on CUDA, the tiny shape on CPU
    python -m effllm_utils.cli.bench --shape gpu --batch 16 --seq 1024 --steps 30
    python -m effllm_utils.cli.bench --shape gpu_large --grad-accum 2 --trace   # the gpu profile's largest, profiled
    python -m effllm_utils.cli.bench --mode decode   # Qwen2.5-1.5B and 0.5B shapes (random bf16 weights) on CUDA:
                                                 # HF eager, static + CUDA graph, + compile (cuBLAS and the
                                                 # Triton GEMV), int4 (tinygemm, Triton W4A16, GemLite)
    python -m effllm_utils.cli.bench --mode harness  # infer.measure: eager vs infer.FastDecode, batch 1 and 4
    python -m effllm_utils.cli.bench --mode decode --device cpu   # SmolLM2-135M GGUF: every precision vs llama.cpp
                                                                  # (cli/cpu_decode.py)

Cases: transformers Qwen2ForCausalLM eager and compiled (the reference anchors), the effllm backbone (dense GQA)
compiled, and the backbone with 8 experts top-2 compiled; optional (`--cases`): `effllm_nsa_compiled` (NSA with
the attention study's gpu settings, FlexAttention on CUDA), `effllm_nsa_ref_compiled` (its dense-mask
reference), `effllm_dense_ce_compiled` (dense with the fused chunked head + cross-entropy, `ce_chunk`), and
`mamba` / `mamba_library` (the attention_free study's transformers Mamba, matched to the dense backbone's parameters,
eager, with effllm's CPU selective scan / with the library's own; on CUDA both are the library's). Each
trains on random tokens through `train.train`
(AdamW, bf16 autocast on GPU, clipping) for `--steps`, the first `--skip` excluded; MFU uses analytic FLOPs and the
device's datasheet peak (or the hardware study's measured peak). Prints measured numbers and ratios; asserts nothing.

Long by design: each benchmark mode (training, decode, harness) prints its side-by-side table from one command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=344, vocab_size=4096, max_position_embeddings=512),
    "gpu": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=2048, vocab_size=151_936, max_position_embeddings=2048),
    # the gpu profile's largest backbone (the moe study's dense_2x): where the >= 45% MFU target applies
    "gpu_large": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                      intermediate_size=2816, vocab_size=151_936, max_position_embeddings=2048),
}


def _qwen2(dims: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=False, attn_implementation="sdpa"))


def _compile_how(case: str, args) -> bool | str:
    """What `train.compiled` gets for a case: its `--compile-mode` (or True) for the *_compiled cases, else False."""
    return (args.compile_mode or True) if case.endswith("compiled") else False


def trace_case(name: str, model, args, rows: int = 18) -> None:
    """A few more compiled training steps under torch.profiler: the kernels taking the most GPU time, and GPU busy
    time over wall time (what is left is the host: launches, Python, synchronisation)."""
    from torch.profiler import ProfilerActivity, profile

    from effllm_utils.engine.train import compiled

    cuda = args.device.startswith("cuda")
    step_fn = compiled(model, _compile_how(name, args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)

    def step():
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
            loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    from effllm_utils.core.runtime import synchronize
    synchronize(args.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        synchronize(args.device)
        wall = (time.perf_counter() - t0) / 3
    print_profile(prof, f"trace {name}", wall, 3, "step", cuda, rows)


def print_profile(prof, title: str, wall: float, count: int, unit: str, cuda: bool, rows: int = 18) -> None:
    """The kernels taking the most time in a torch.profiler run of `count` units, GPU busy time over wall time, and
    (on CUDA) the number of kernel launches per unit."""
    ka = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    line = f"--- {title}: {wall * 1e3:.3f} ms/{unit} wall"
    if cuda:
        gpu = [e for e in ka if e.device_type.name == "CUDA"]
        busy = sum(getattr(e, key) for e in gpu) / count / 1e6
        line += (f", GPU kernels {busy * 1e3:.3f} ms/{unit} ({100 * busy / wall:.0f}% busy), "
                 f"{sum(e.count for e in gpu) / count:.0f} kernels/{unit}")
    print(line)
    print(ka.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def last_period(names: list[str]) -> int | None:
    """The length of the shortest block that ends the sequence and repeats just before it (one decode step's
    kernels: the step's tail kernels occur once per step, so a layer's repeats cannot match)."""
    return next((p for p in range(1, len(names) // 2 + 1) if names[-p:] == names[-2 * p:-p]), None)


def print_step_kernels(prof, n_layers: int, layers_shown: int = 2) -> None:
    """The kernels of the last decode step in launch order, with their durations: its first `layers_shown` layers'
    worth and its tail (final norm, lm_head, greedy choice). Every replay launches the same kernels, so the step is
    the shortest period of the kernel-name sequence at the end of the profile."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    period = last_period([e.name for e in kernels])
    if period is None:
        return
    step = kernels[-period:]
    per_layer = period / max(n_layers, 1)
    print(f"--- last step: {period} kernels (~{per_layer:.1f} per layer); launch order:")
    show = int(round(per_layer * layers_shown))
    for e in step[:show] + ([] if period <= show + 6 else step[-6:]):
        print(f"  {e.time_range.end - e.time_range.start:8.1f} us  {e.name[:110]}")


def run_case(name: str, model, fpt: float, active_params: int, args, peak: float | None) -> dict:
    from effllm_utils.engine.train import TrainConfig, train

    ids = torch.randint(0, model.config.vocab_size, (args.batch * args.seq * 4 + 2,))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=1e-4, warmup_steps=1,
                      eval_every=10**9, eval_batches=1, skip_steps=args.skip,
                      compile=_compile_how(name, args),
                      grad_accum=args.grad_accum,
                      precision=args.precision)
    r = train(model.to(args.device), ids, ids, cfg, flops_per_token=fpt, peak_flops=peak)
    m = r["metrics"]
    return {"case": name, "tokens_per_s": m["tokens_per_s"], "mfu_pct": m.get("mfu_pct"), "al_s": m["al_s"],
            "active_params": active_params, "peak_mem_gb": m["peak_mem_gb"]}


DECODE_SHAPES = {  # Qwen2.5 model cards (tied embeddings)
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151_936, max_position_embeddings=4096),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151_936, max_position_embeddings=4096),
    "tiny": dict(SHAPES["tiny"]),
}


def _dtype(args, cuda: bool) -> torch.dtype:
    """--dtype, else bf16 on CUDA and fp32 on CPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]


def decode_bench(args) -> int:
    """Batch-1 greedy decode: HF generate (eager) vs the static-cache decoder (CUDA graph; compiled + CUDA graph) in
    the model's dtype (cuBLAS, and effllm's Triton GEMV on CUDA), and with int4 weights (tinygemm; on CUDA also
    effllm's Triton W4A16 kernels and GemLite where installed), side by side on the same random-weight model."""
    import statistics

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from effllm_utils.engine import decode, w4a16
    from effllm_utils.measure import hardware

    cuda = args.device.startswith("cuda")
    dtype = _dtype(args, cuda)
    bw = hardware.memory_bandwidth(2048 if cuda else 64, args.device, 0.5, 3)["metrics"]["mem_bw_gbs"] * 1e9
    print(f"device {args.device}, measured copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"dtype {str(dtype).removeprefix('torch.')}, "
          f"batch 1, {args.new_tokens} new tokens; roofline = bandwidth / bytes read per token", flush=True)
    shapes = args.decode_shapes.split(",") if args.decode_shapes else (
        ["qwen2.5-1.5b", "qwen2.5-0.5b"] if cuda else ["tiny"])
    new = args.new_tokens
    for name in shapes:
        torch.manual_seed(0)
        hf = Qwen2ForCausalLM(Qwen2Config(**DECODE_SHAPES[name], tie_word_embeddings=True))
        hf = hf.to(args.device, dtype).eval()
        ids = torch.randint(0, hf.config.vocab_size, (1, 16), device=args.device)
        rates = {}
        print(f"{name}: {decode.weight_bytes(hf) / 1e9:.2f} GB of {str(dtype).removeprefix('torch.')} weights",
              flush=True)

        def report(label, r, nbytes):
            rates[label] = r
            pct = 100 * decode.roofline_fraction(r, nbytes, bw)
            print(f"  {label:<34} {r:8.1f} tok/s   {pct:5.1f}% of roofline "
                  f"({nbytes / 1e9:.2f} GB/token)", flush=True)

        hf_new = min(new, 32)  # eager is slow; its rate does not depend on the count

        def hf_rate():
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=hf_new, min_new_tokens=hf_new, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize() if cuda else None
            return hf_new / (time.perf_counter() - t0)

        if not args.skip_eager:
            hf_rate()
            report("hf_generate_eager", statistics.median(hf_rate() for _ in range(3)), decode.weight_bytes(hf))
        ours = decode.from_hf(hf)
        del hf
        graph = "_cuda_graph" if cuda else ""
        triton_ok = cuda and w4a16.available(args.device)
        # (label, weights, compile, int4 kernel, dense kernel)
        variants = [(f"static{graph}", "native", False, "tinygemm", "cublas"),
                    (f"static_compiled{graph}", "native", True, "tinygemm", "cublas")]
        if triton_ok:
            variants.append((f"static_compiled_triton_gemv{graph}", "native", True, "tinygemm", "triton"))
        if args.autotune:
            variants.append((f"static_autotuned{graph}", "native", "max-autotune-no-cudagraphs", "tinygemm", "cublas"))
        int4_kernels = ["tinygemm"] + (["triton"] if triton_ok else []) + (
            ["gemlite"] if cuda and importlib.util.find_spec("gemlite") else [])
        if cuda or dtype == torch.bfloat16:
            variants += [(f"int4_{k}_static_compiled{graph}", "int4", True, k, "cublas") for k in int4_kernels]
        for label, weights, comp, kernel, dense in variants:
            if (comp and not cuda and not args.compile_cpu) or (
                    args.decode_variants and not any(v in label for v in args.decode_variants.split(","))):
                continue
            try:
                dec = decode.StaticDecoder(ours, 1, 16 + new + 1, cuda_graph=cuda, compile=comp, weights=weights,
                                           int4_kernel=kernel, dense_kernel=dense)
                dec.generate(ids, new)  # warm-up: compilation and graph capture (int4 layers were checked when built)
            except ValueError as e:  # e.g. int4 on a shape its kernel cannot tile
                print(f"  {label:<34} skipped: {e}", flush=True)
                continue
            except Exception as e:  # a third-party kernel (GemLite) failing: report it, keep the other variants
                if kernel != "gemlite" or weights != "int4":
                    raise
                print(f"  {label:<34} FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
                continue
            runs_ = []
            for _ in range(5):
                _, stamps = dec.generate(ids, new)
                runs_.append((new - 1) / (stamps[-1] - stamps[0]))  # decode tokens only, from per-token stamps
            report(label, statistics.median(runs_), dec.read_bytes)
            if args.trace:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                    _, stamps = dec.generate(ids, new)
                print_profile(prof, f"trace {name} {label} (one request, prefill included)",
                              (stamps[-1] - stamps[0]) / (new - 1), new, "token", cuda, rows=12)
                if cuda:
                    print_step_kernels(prof, len(ours.model.layers))
            del dec
        bf = rates.get(f"static_compiled{graph}")
        tg = rates.get(f"static_compiled_triton_gemv{graph}")
        if bf and tg:
            print(f"  Triton GEMV / cuBLAS, {str(dtype).removeprefix('torch.')} decode tokens/s (compiled, batch 1): "
                  f"{tg / bf:.2f}x", flush=True)
        for k in int4_kernels:
            i4 = rates.get(f"int4_{k}_static_compiled{graph}")
            for base, rate in (("cuBLAS", bf), ("Triton GEMV", tg)):
                if rate and i4:
                    print(f"  int4 ({k}) / {str(dtype).removeprefix('torch.')} ({base}) decode tokens/s (compiled, "
                          f"batch 1): {i4 / rate:.2f}x", flush=True)
        del ours
        if cuda:
            torch.cuda.empty_cache()
    return 0


def harness_bench(args) -> int:
    """The quantization study's harness (`infer.measure`, interleaved, per-token stamps) on one random Qwen2-shape
    model decoded eagerly and through `infer.FastDecode`, over a batch-size sweep: what the `decode: static` param
    buys."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from effllm_utils.engine import infer

    cuda = args.device.startswith("cuda")
    name = (args.decode_shapes or ("qwen2.5-0.5b" if cuda else "tiny")).split(",")[0]
    dtype = _dtype(args, cuda)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**DECODE_SHAPES[name], tie_word_embeddings=True)).to(args.device, dtype).eval()
    prompt, new = 64, args.new_tokens
    cfg = infer.InferConfig(prompt_len=prompt, new_tokens=new, batch_sizes=(1, 4), min_time_s=1.0, min_requests=3)
    prompts = torch.randint(0, hf.config.vocab_size, (4, prompt))
    fast = infer.FastDecode(hf, prompt + new + 1)
    out = infer.measure({"eager": hf, fast.path: fast}, prompts, cfg, args.device)
    print(f"{name}, {str(dtype).removeprefix('torch.')}, prompt {prompt}, {new} new tokens, infer.measure:")
    for k, m in out.items():
        print(f"  {k:<22} batch {m['latency_batch']}: decode p50 {m['decode_token_p50_s'] * 1e3:7.2f} ms/token   p90 "
              f"{m['decode_token_p90_s'] * 1e3:7.2f}   prefill {m['prefill_s'] * 1e3:7.2f} ms   IT by batch "
              + ", ".join(f"{b}: {v:,.0f} tok/s" for b, v in m["it_by_batch"].items()), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    from effllm_utils.engine.train import COMPILE_MODES

    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=SHAPES, default=None, help="default: gpu on CUDA, tiny on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 8 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default: 1024 on CUDA, 128 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 on CUDA, 8 on CPU")
    ap.add_argument("--skip", type=int, default=None, help="steps excluded (compilation); default 10 on CUDA, 3 on CPU")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cases", default="qwen2_eager,qwen2_compiled,effllm_dense_compiled,effllm_moe_compiled")
    ap.add_argument("--profile", default="tiny", help="whose hardware records give the peak of an unknown device")
    ap.add_argument("--mode", choices=("train", "decode", "harness"), default="train")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode mode: tokens generated per request")
    ap.add_argument("--decode-shapes", default="", help=f"decode mode: comma-separated, of {', '.join(DECODE_SHAPES)} "
                    "(random weights; on CPU without it: the packaged GGUF model beside llama.cpp)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="decode mode: weight dtype (default bf16 on CUDA, fp32 on CPU; int4 runs from bf16 only)")
    ap.add_argument("--skip-eager", action="store_true", help="decode mode: leave out HF generate (slow)")
    ap.add_argument("--decode-variants", default="",
                    help="decode mode: comma-separated substrings; only decoders whose label holds one run "
                         "(e.g. 'compiled' or 'static_compiled,int4_triton')")
    ap.add_argument("--grad-accum", type=int, default=1, help="train mode: micro-batches per optimizer step")
    ap.add_argument("--ce-chunk", type=int, default=4096,
                    help="train mode: tokens per chunk of the effllm_dense_ce_compiled case's fused head + loss")
    ap.add_argument("--compile-cpu", action="store_true", help="decode mode: also time torch.compile on CPU")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                    help="train mode: torch.compile mode of the *_compiled cases (default: inductor's default)")
    ap.add_argument("--autotune", action="store_true",
                    help="decode mode: also compile with inductor's max-autotune (Triton GEMV templates; slow compile)")
    ap.add_argument("--gguf", default="smollm2-135m",
                    help="decode mode on CPU: the packaged GGUF model (models.packaged)")
    ap.add_argument("--prompt-len", type=int, default=16, help="decode mode on CPU: prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="decode mode on CPU: timed requests per row (median)")
    ap.add_argument("--rounds", type=int, default=10, help="decode mode on CPU: alternating rounds of the fastest "
                    "static row against llama.cpp for their ratio's confidence interval (0: skip)")
    ap.add_argument("--no-compile", action="store_true", help="decode mode on CPU: leave out the torch.compile rows")
    ap.add_argument("--gptqmodel", action="store_true",
                    help="decode mode on CPU: also GPTQModel's int4 CPU kernel (quantizes the model first, ~1 min)")
    ap.add_argument("--trace", action="store_true", help="profile a few training steps of each case (train mode) or "
                    "one request of each decoder (decode mode): the kernels taking the most time, kernels per token")
    return ap


def _train_case(case: str, dims: dict, args):
    """(model, training FLOPs per token, active matmul parameters) of a train-mode case,
    or None for an unknown case."""
    from effllm_utils import models
    from effllm_utils.measure import metrics

    def counts(cfg):  # training FLOPs per token, active matmul parameters (analytic: no model is built)
        shape = cfg.shape()
        return metrics.training_flops_per_token(shape, args.seq), metrics.forward_flops_per_token(shape, 0) / 2

    def made(cfg):
        return (models.EffLLMForCausalLM(cfg), *counts(cfg))

    dense_cfg = models.EffLLMConfig(**dims, attention="gqa")
    if case.startswith("qwen2"):
        return _qwen2(dims), *counts(dense_cfg)
    if case.startswith("effllm_dense"):  # effllm_dense_ce*: the fused chunked head + loss (--ce-chunk)
        cfg = models.EffLLMConfig(**dims, attention="gqa", ce_chunk=args.ce_chunk if "_ce" in case else 0)
        return models.EffLLMForCausalLM(cfg), *counts(dense_cfg)
    if case.startswith("effllm_moe"):
        return made(models.EffLLMConfig(**dims, attention="gqa", ffn="moe", num_local_experts=8,
                                        num_experts_per_tok=2))
    if case in ("mamba", "mamba_library"):  # the attention_free baseline: effllm's CPU scan / the library's
        from effllm_utils.models.baselines import build_baseline, forward_flops_per_token

        target = models.EffLLMForCausalLM(dense_cfg).num_parameters()
        model = build_baseline("mamba", target, dims["num_hidden_layers"], dims["vocab_size"], args.seq)
        return model, 3.0 * forward_flops_per_token(model, "mamba", args.seq), model.num_parameters()  # as the study
    if case.startswith("effllm_nsa"):  # the attention study's gpu NSA settings; _ref: the dense-mask kernel
        return made(models.EffLLMConfig(**dims, attention="nsa", nsa_block_size=64, nsa_num_selected=16,
                                        nsa_window=512, nsa_kernel="reference" if "_ref" in case else "auto"))
    return None


def _print_ratios(by: dict[str, dict], args) -> None:
    """The side-by-side ratios of the train-mode cases that ran."""
    from effllm_utils.models import mamba_scan

    def rate(a, b):
        return by[a]["tokens_per_s"] / by[b]["tokens_per_s"]

    if "qwen2_eager" in by and "effllm_dense_compiled" in by:
        print(f"effllm dense compiled / transformers Qwen2 eager tokens/s: "
              f"{rate('effllm_dense_compiled', 'qwen2_eager'):.2f}x")
    if "effllm_dense_ce_compiled" in by and "effllm_dense_compiled" in by:
        d, f = by["effllm_dense_compiled"], by["effllm_dense_ce_compiled"]
        print(f"fused chunked head + loss (ce_chunk {args.ce_chunk}) / plain cross-entropy: tokens/s "
              f"{rate('effllm_dense_ce_compiled', 'effllm_dense_compiled'):.2f}x, peak memory "
              f"{f['peak_mem_gb']:.1f} vs {d['peak_mem_gb']:.1f} GB")
    if "effllm_nsa_compiled" in by and "effllm_nsa_ref_compiled" in by:
        print(f"NSA FlexAttention / dense-mask reference tokens/s: "
              f"{rate('effllm_nsa_compiled', 'effllm_nsa_ref_compiled'):.2f}x")
    if "mamba" in by and "mamba_library" in by:
        print(f"Mamba tokens/s, {mamba_scan.scan_in_use(args.device)} / transformers' own scan: "
              f"{rate('mamba', 'mamba_library'):.2f}x")
    if "effllm_moe_compiled" in by and "effllm_dense_compiled" in by:
        d, m = by["effllm_dense_compiled"], by["effllm_moe_compiled"]
        ratio = (m["tokens_per_s"] * m["active_params"]) / (d["tokens_per_s"] * d["active_params"])
        print(f"MoE vs dense, tokens/s x active matmul params (achieved useful FLOP rate): {ratio:.2f} "
              f"(MoE {m['active_params'] / 1e6:.0f}M active vs dense {d['active_params'] / 1e6:.0f}M)")


def train_bench(args) -> int:
    """Training throughput and MFU of each `--cases` entry at one shape, then their ratios."""
    from effllm_utils.measure.hardware import device_peak
    from effllm_utils.models import mamba_scan

    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("gpu" if cuda else "tiny")
    args.batch, args.seq = args.batch or (16 if cuda else 8), args.seq or (1024 if cuda else 128)
    args.steps = args.steps or (30 if cuda else 8)
    args.skip = args.skip if args.skip is not None else (10 if cuda else 3)
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; run `make bench` on a GPU host or pass --device cpu",
              file=sys.stderr)
        return 2
    dims = SHAPES[args.shape]
    peak, source = device_peak(args.profile, args.device, args.precision)
    print(f"device {args.device}, shape {args.shape} {dims}, batch {args.batch}x{args.seq} x {args.grad_accum} "
          f"micro-batch(es) per step, compile mode {args.compile_mode or 'default'}, peak: "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s ({source})")
    by = {}
    for case in args.cases.split(","):
        torch.manual_seed(0)
        made = _train_case(case, dims, args)
        if made is None:
            print(f"error: unknown case {case!r}", file=sys.stderr)
            return 2
        model, fpt, active = made
        with mamba_scan.using_library_scan() if case == "mamba_library" else contextlib.nullcontext():
            r = by[case] = run_case(case, model, fpt, active, args, peak)
        print(f"{r['case']:<24} {r['tokens_per_s']:>12,.0f} tokens/s   MFU {r['mfu_pct'] or float('nan'):6.1f}%   "
              f"{r['al_s'] * 1e3:8.1f} ms/step   peak mem {r['peak_mem_gb']:.1f} GB", flush=True)
        if args.trace:
            trace_case(case, model, args)
        del model
        if cuda:
            torch.cuda.empty_cache()
    _print_ratios(by, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "decode" and not args.device.startswith("cuda") and not args.decode_shapes:
        from effllm_utils.cli import cpu_decode

        return cpu_decode.run(args)  # a real GGUF model on CPU, beside llama.cpp
    return {"decode": decode_bench, "harness": harness_bench, "train": train_bench}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
