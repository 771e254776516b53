"""llama.cpp (through `llama-cpp-python`) as the CPU decode anchor: the same GGUF file a CPU user would run, decoded
greedily at batch 1 and timed per token as the suite's own decoders are (decode tokens only, prefill excluded).

`llama-cpp-python` is optional and built from source (`make llama-cpp`, ~5 min on 2 cores, with portable flags:
`-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON`; the native build crashed on an AVX-512 host).
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(gguf: Path, n_ctx: int = 512, threads: int | None = None):
    """A llama_cpp.Llama over `gguf` on `threads` CPU threads (default: torch's thread count, so both sides of a
    comparison use the same cores)."""
    if not available():
        raise ModuleNotFoundError("llama-cpp-python is not installed; build it with `make llama-cpp` (~5 min)")
    import torch
    from llama_cpp import Llama

    n = threads or torch.get_num_threads() or os.cpu_count()
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=n, n_threads_batch=n, n_batch=n_ctx, verbose=False)


def greedy_stamps(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after `prompt` and a host timestamp after each (the first after the prefill), as
    `decode.StaticDecoder.generate` gives them."""
    llm.reset()
    llm.eval(prompt)
    out, stamps = [], []
    for i in range(new_tokens):
        tok = llm.sample(top_k=1, temp=0.0)
        out.append(int(tok))
        stamps.append(time.perf_counter())
        if i + 1 < new_tokens:
            llm.eval([tok])
    return out, stamps


def request_rate(llm, prompt: list[int], new_tokens: int) -> float:
    """One request's decode tokens/s (the prefill excluded)."""
    _, stamps = greedy_stamps(llm, prompt, new_tokens)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_rate(llm, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Median decode tokens/s over `repeats` requests (one warm-up first)."""
    import statistics

    greedy_stamps(llm, prompt, min(new_tokens, 8))
    return statistics.median(request_rate(llm, prompt, new_tokens) for _ in range(repeats))


def version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")
