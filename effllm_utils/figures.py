"""`make figures`: re-draw every study's figures from the stored records, without running any experiment.

    python -m effllm_utils.figures --profile tiny
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import PROFILES

# study -> "module:function", called as function(profile, study); each draws from records only and returns the paths
# it wrote.
FIGURES = {
    "hardware": "effllm_utils.hardware:figures",
    **{s: "effllm_utils.pretrain:figures" for s in ("attention", "positional_encoding", "moe", "attention_free",
                                                     "depth_width")},
    "peft": "effllm_utils.finetune:figures",
    "quantization": "effllm_utils.quantize:figures",
    "lvm": "effllm_utils.vision:lvm_figures",
    "vlm": "effllm_utils.vlm:figures",
}


def draw(profile: str, studies: list[str] | None = None) -> dict[str, list]:
    out = {}
    for study, target in FIGURES.items():
        if studies and study not in studies:
            continue
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        out[study] = fn(profile, study)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.figures", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    args = ap.parse_args(argv)
    drawn = draw(args.profile)
    for study, paths in drawn.items():
        print(f"{study}: " + (", ".join(str(p) for p in paths) if paths else "no records yet (run make reproduce)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
