"""The study registry: the only list of studies, and everything generic code needs to know about each one.

A study is declared once here: its id (= notebook name = record folder), what varies, the function that runs it, its
quality metric, what splits its records into experiments beside (technique, scale), the report views that draw its
table and figures, the check its params get before any run, and how its techniques map onto the paper's rows.
`reproduce`, the report, the claims check and the figures iterate this registry; no generic module branches on a
study's name. This module imports nothing heavy: functions are named as "module:function" strings and resolved when
called (run functions under effllm_utils.studies, views under effllm_utils.report, checks anywhere below studies).

Adding a study: a notebook `notebooks/<id>.ipynb`, params files, a run function, views, and one `register(Study(...))`
call (here, or in a researcher's own module before the run). See docs/adding-a-technique.md for adding a technique
to an existing study, which needs no entry here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class PaperRows:
    """How the paper's published rows map onto our techniques (reference/efficientllm_paper_values/<file>)."""

    file: str
    where: dict[str, str]  # column -> value filter selecting the rows (table, scale, model)
    column: str  # the column naming the method
    names: dict[str, str]  # paper's method name -> our technique
    metrics: dict[str, str]  # our metric key -> the paper's column
    what: str  # which rows these are, for captions


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    what: str  # what varies (one line)
    run: str | None = None  # "studies module:function" run(study, profile, P, force) -> records; None: the notebook
    quality: str | None = None  # the record's quality metric (ppl, loss, fid); None: not a quality study
    group_by: tuple[str, ...] = ()  # record params that make separate experiments beside (technique, scale)
    part_suffix: str = ""  # records whose scale ends with it are the study's second part (left out of paper rows)
    figures: str | None = None  # "report module:function" figures(profile, study) -> paths written
    table: str | None = None  # "report module:function" table(profile, study) -> DataFrame (or {name: DataFrame})
    check: str | None = None  # "module:function" check(P): params that cannot run are a ValueError before any run
    paper: PaperRows | None = None
    reads_all: bool = False  # draws from every study's records: submitted jobs start it after the others

    def is_main_part(self, record) -> bool:
        """Whether a record belongs to the part of the study the paper's rows and the Pareto fronts compare."""
        return not (self.part_suffix and record.scale.endswith(self.part_suffix))


def resolve(target: str, package: str) -> Callable[..., Any]:
    """"module:function" (relative to effllm_utils.<package>, or a full dotted path) -> the function."""
    module, _, name = target.partition(":")
    path = module if module.startswith("effllm_utils.") else f"effllm_utils.{package}.{module}"
    return getattr(importlib.import_module(path), name)


_ARCH = {"ppl": "ppl", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "tt": "tt_tokens_per_param_s", "aec_w": "aec_w"}


def _pretraining(name: str, what: str, paper: PaperRows | None) -> Study:
    return Study(name, what, run="pretraining:run_study", quality="ppl", figures="views:pretraining_figures",
                 table="views:pretraining_table", check="effllm_utils.models.techniques:check_specs", paper=paper)


_REGISTRY: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add (or replace) a study; the order of registration is the order `make reproduce` runs them in."""
    _REGISTRY[study.name] = study
    return study


for _s in (
    Study("hardware", "calibration: measured matmul peak, memory bandwidth, idle power, telemetry overhead",
          figures="views:hardware_figures"),
    _pretraining("attention", "MHA, GQA, MQA, MLA, NSA", PaperRows(
        "pretrain_architecture.csv", {"paper_table": "3", "scale": "1.5B"}, "method",
        {"MQA": "mqa", "GQA": "gqa", "MLA": "mla", "NSA": "nsa"}, _ARCH, "Table 3, 1.5B")),
    _pretraining("positional_encoding", "RoPE, sinusoidal, learned, relative, none", PaperRows(
        "pretrain_architecture.csv", {"paper_table": "4"}, "method",
        {"RoPE": "rope", "Absolute": "sinusoidal", "Learnable Absolute": "learned", "Relative (Relate)": "relative",
         "None": "none"}, _ARCH, "Table 4, 1.5B")),
    _pretraining("moe", "dense vs top-k MoE at matched active / total parameters", PaperRows(
        "pretrain_architecture.csv", {"paper_table": "5"}, "method",
        {"Dense 1.5B": "dense", "Dense 3B": "dense_2x", "MoE 1.5Bx8": "moe_8x", "MoE 0.5Bx8": "moe_8x_half"}, _ARCH,
        "Table 5 (1.5B dense, 3B dense, 1.5Bx8 and 0.5Bx8 top-2 MoE)")),
    _pretraining("attention_free", "Transformer vs Mamba, RWKV, Pythia at matched parameters", PaperRows(
        "pretrain_architecture.csv", {"paper_table": "6"}, "method",
        {"Transformer (Qwen2.5)": "transformer", "Mamba": "mamba", "RWKV": "rwkv", "Pythia": "pythia"}, _ARCH,
        "Table 6, 1.5B")),
    _pretraining("depth_width", "depth/width ratio at fixed parameter count", None),
    Study("peft", "Full, Freeze, LoRA, LoRA+, RSLoRA, DoRA, PiSSA (x model, x dataset)",
          run="finetuning:run_study", quality="loss", group_by=("dataset",), figures="views:peft_figures",
          table="views:peft_table", check="effllm_utils.engine.suite:check_params", paper=PaperRows(
              "peft.csv", {"paper_table": "7", "model": "Llama-3.2-1B"}, "method",
              {"LoRA": "lora", "LoRA-plus": "lora_plus", "RSLoRA": "rslora", "DoRA": "dora", "PiSSA": "pissa",
               "Freeze": "freeze", "Full*": "full"},
              {"loss": "loss", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "st": "st_samples_per_param_s",
               "aec_w": "aec_w"}, "Table 7, Llama-3.2-1B on OpenO1-SFT")),
    Study("quantization", "fp32, fp16, bf16, int8 weight-only, int4 GPTQ, int4 RTN", run="quantization:run_study",
          quality="ppl", figures="views:quantization_figures", table="views:quantization_table",
          check="effllm_utils.engine.suite:check_params", paper=PaperRows(
              "quantization.csv", {"model": "DeepSeek-R1-Distill-Qwen-14B"}, "precision",
              {"bfloat16": "bf16", "float16": "fp16", "int4": "int4_gptq"},
              {"score": "avg_perf", "amu_gb": "amu_gb", "it": "it_tokens_per_s", "aec_w": "aec_w", "mcr": "mcr"},
              "Table 9, DeepSeek-R1-Distill-Qwen-14B")),
    Study("lvm", "DiT with the attention variants and MoE; PEFT on DiT (scale '<name>-ft')", run="lvm:run_study",
          quality="fid", part_suffix="-ft", figures="views:lvm_figures", table="views:lvm_tables",
          check="effllm_utils.models.techniques:check_specs", paper=PaperRows(
              "lvm_vlm.csv", {"paper_table": "10"}, "method",
              {"MHA": "mha", "MQA": "mqa", "GQA": "gqa", "MLA": "mla", "NSA": "nsa"},
              {"fid": "quality", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "tt": "throughput", "aec_w": "aec_w"},
              "Table 10, DiT-XL/2 on ImageNet (Inception FID; ours is digits-FID)")),
    Study("vlm", "PEFT methods on a LLaVA-style vision-language model", run="vlm:run_study", quality="loss",
          figures="views:vlm_figures", table="views:vlm_table", check="effllm_utils.engine.suite:check_vlm_params",
          paper=PaperRows(
              "lvm_vlm.csv", {"paper_table": "12", "model": "Qwen2.5-VL-7B"}, "method",
              {"LoRA": "lora", "LoRA-plus": "lora_plus", "RSLoRA": "rslora", "PiSSA": "pissa", "Full*": "full"},
              {"loss": "quality", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "st": "throughput", "aec_w": "aec_w"},
              "Table 12, Qwen2.5-VL-7B")),
    Study("paper_figures", "aggregates all records: figures, tables, claims check vs the paper", reads_all=True),
):
    register(_s)


def names() -> tuple[str, ...]:
    """Every study id, in the order `make reproduce` runs them (hardware first: the others use its measured peak;
    paper_figures last: it reads everyone's records)."""
    return tuple(_REGISTRY)


def get(name: str) -> Study:
    if name not in _REGISTRY:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def run(name: str, profile: str, P: dict[str, Any], force: bool = False) -> list:
    """Run a study (every technique not yet recorded) and return its records."""
    study = get(name)
    if study.run is None:
        raise ValueError(f"study {name!r} is run by its notebook's cells, not by a run function")
    _check_shared(P)
    return resolve(study.run, "studies")(name, profile, P, force=force)


def _check_shared(P: dict[str, Any]) -> None:
    """Params every study may carry: `trackers` (unknown or not installed: one line before any run), an LR sweep's
    seed (not one of the reported seeds)."""
    from effllm_utils.engine.sweep import check_sweep_seed

    check_sweep_seed(P)
    if "trackers" in P:
        from effllm_utils.engine import tracking

        tracking.parse(P["trackers"])


def check(name: str, P: dict[str, Any]) -> None:
    """The study's own check of its params (technique and model specs) and the shared ones, before anything runs."""
    study = get(name)
    _check_shared(P)
    if study.check is not None:
        resolve(study.check, "studies")(P)


def summary(profile: str, name: str, sweep_points: bool = False) -> list:
    """The study's records as tables and figures show them: one per experiment, repeats averaged
    (core.aggregate.load_summary with this study's grouping); the points of LR sweeps (engine.sweep) only with
    `sweep_points` (tables list them; figures and comparisons use each technique's record at its best LR)."""
    from effllm_utils.core import aggregate
    from effllm_utils.engine.sweep import is_sweep_point

    recs = aggregate.load_summary(profile, name, get(name).group_by)
    return recs if sweep_points else [r for r in recs if not is_sweep_point(r)]


def current(profile: str, name: str) -> list:
    """The study's ok records that its tables show (each experiment's newest settings, every repeat kept)."""
    from effllm_utils.core import aggregate

    return aggregate.load_current(profile, name, get(name).group_by)
