"""Not a timing: where does a trained toy concept live, and what moves its edits? The demo's three goal
prompts (reconstruction, background edit, added object) generated from one concept file and scored as the
demo scores them, (a) with each group of the concept's adapters switched off in turn, (b) at several
identity / motion scales. `--train-targets` first trains the demo's concept with the LoRA on other targets.

    python -m benchmarks.concept_probe --concept runs/demo/work/ours.safetensors --seed 0
    python -m benchmarks.concept_probe --train-targets cross --seed 0 --out runs/probe-cross
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

import toyworld.experiment as X
import toyworld.prompts as P
from lora.inject import DEFAULT_TARGETS
from lora.layers import ConceptAdapter
from toyworld.demo import DemoSettings, load, personalize
from toyworld.demo_report import goals
from toyworld.report import summarize
from toyworld.runner import generate_jobs
from train.recipe import HEAD_TARGET

GROUPS = {"none": None, "head": r"^head\.", "ffn": r"\.ffn\.", "self_attn": r"\.self_attn\.",
          "cross_qo": r"\.cross_attn\.(q|o)\.", "cross_kv": r"\.cross_attn\.(k|v)\.",
          "every_block": r"^blocks\."}
SCALES = [(1.0, 1.0), (0.75, 1.0), (0.5, 1.0), (0.75, 0.75), (0.5, 0.5)]
TARGETS = {"cross": (r"blocks\.\d+\.cross_attn\.(q|k|v|o)",), "nohead": DEFAULT_TARGETS,
           "no_cross": (r"blocks\.\d+\.self_attn\.(q|k|v|o)", r"blocks\.\d+\.ffn\.(0|2)", HEAD_TARGET)}


def switch_off(dit: torch.nn.Module, pattern: str | None) -> int:
    """Zero B1 and B2 of every adapter whose module name matches: that group adds nothing."""
    hits = [m for name, m in dit.named_modules()
            if pattern and isinstance(m, ConceptAdapter) and re.search(pattern, name)]
    with torch.no_grad():
        for m in hits:
            m.lora_B1.zero_()
            m.lora_B2.zero_()
    return len(hits)


def probe(scene, file: Path, off: str, identity: float, motion: float) -> list[dict]:
    pipe, adapter = X.concept_pipeline(scene.base, file)
    n = switch_off(pipe.dit, GROUPS[off])
    spec, rows = scene.spec, []
    prompts = {"recon": P.full_prompt(spec), "edit_background": P.full_prompt(spec, P.edit_background(spec)),
               "edit_object": P.full_prompt(spec, extra=P.EXTRA)}
    for kind, prompt in prompts.items():
        job = X.Job(kind, prompt, identity, motion, X.seeds(scene.budget.samples))
        [g] = generate_jobs(pipe, adapter, [job], scene.world, scene.budget, scene.score(kind))
        summary = summarize(g.scores)
        mean = {k: (summary.get(k) or {}).get("mean") for k in
                ("id_crop", "id_crop_min", "motion_fidelity", "trajectory_error", "extra_adherence",
                 "edit_background")}
        passed = sum(x["pass"] for x in goals(summary, kind))
        rows.append({"off": off, "adapters_off": n, "identity": identity, "motion": motion, "job": kind,
                     **mean, "goals": f"{passed}/{len(goals(summary, kind))}"})
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", type=Path, help="the demo concept's file (or --train-targets)")
    parser.add_argument("--train-targets", choices=sorted(TARGETS), help="train the demo's concept on these")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the demo run it comes from")
    parser.add_argument("--out", type=Path, default=Path("runs/concept-probe"))
    args = parser.parse_args()
    if (args.concept is None) == (args.train_targets is None):
        parser.error("give --concept FILE or --train-targets NAME")
    budget = {"targets": TARGETS[args.train_targets]} if args.train_targets else {}
    scene = load(DemoSettings(out=args.out, seed=args.seed, ablation=False, budget=budget, progress=False))
    file = args.concept or personalize(scene)[0]["ours"]
    rows = [r for off in GROUPS for r in probe(scene, file, off, 1.0, 1.0)]
    rows += [r for a, b in SCALES[1:] for r in probe(scene, file, "none", a, b)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'probe.json'}")


if __name__ == "__main__":
    main()
