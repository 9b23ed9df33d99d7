"""The demo's report: every job's scores over seeds, the issue's goals checked, and the markdown page."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from toyworld import experiment as X
from toyworld import prompts as P
from toyworld.report import fmt, fmt_pm, markdown_table, mean_of, summarize

if TYPE_CHECKING:
    from toyworld.demo import Scene
    from toyworld.runner import Generated

GOAL_TEXT = {
    "mse": "MSE below the flat-video floor",
    "trajectory": "trajectory error <= half the centre-guess floor",
    "velocity": "velocity correlation >= 0.8",
    "appearance": "appearance: every frame's crop cosine above the flat-colour floor",
    "background": "requested background >= 90% of seeds",
    "extra": "added object present and moving as asked >= 90% of seeds",
}
GOAL_JOBS = ("recon", "edit_background", "edit_object", "edit_object_region")  # whose goals it checks
PASSES = {"<": operator.lt, "<=": operator.le, ">=": operator.ge, ">": operator.gt}

COLUMNS = [  # (summary key, header)
    ("mse", "MSE"),
    ("mse_floor", "flat floor"),
    ("trajectory_error", "traj err px"),
    ("centre_floor", "centre floor"),
    ("motion_fidelity", "vel corr"),
    ("id", "ID colour"),
    ("id_crop", "ID crop"),
    ("id_crop_min", "ID crop worst frame"),
    ("id_crop_floor", "flat-colour floor"),
    ("temporal_coherence", "TC"),
    ("edit_background", "bg right"),
    ("extra_adherence", "added obj ok"),
    ("detection", "detected"),
]


def goal_rows(summary: dict, kind: str) -> list[tuple[str, float, float, str]]:
    """(goal, measured, floor or threshold, operator) of one job's summary."""
    rows = []
    if kind == "recon":
        rows.append(("mse", mean_of(summary, "mse"), mean_of(summary, "mse_floor"), "<"))
    if kind == "edit_background":
        rows.append(("background", mean_of(summary, "edit_background"), 0.9, ">="))
    if kind == "edit_object":
        rows.append(("extra", mean_of(summary, "extra_adherence"), 0.9, ">="))
    return rows + [
        ("trajectory", mean_of(summary, "trajectory_error"), 0.5 * mean_of(summary, "centre_floor"), "<="),
        ("velocity", mean_of(summary, "motion_fidelity"), 0.8, ">="),
        ("appearance", mean_of(summary, "id_crop_min"), mean_of(summary, "id_crop_floor"), ">"),
    ]


def goals(summary: dict, kind: str) -> list[dict]:
    """The issue's goals for one job's summary: measured, floor or threshold, pass."""
    return [{"goal": GOAL_TEXT[key], "value": value, "bound": bound, "op": op,
             "pass": bool(PASSES[op](value, bound))} for key, value, bound, op in goal_rows(summary, kind)]


def job_entry(run: str, kind: str, g: Generated) -> dict:
    summary = summarize(g.scores)
    entry = {"run": run, "job": g.job.name, "kind": kind, "prompt": g.job.prompt, "identity": g.job.identity,
             "motion": g.job.motion, "seeds": list(g.job.seeds), "summary": summary, "per_seed": g.scores}
    if g.job.name in GOAL_JOBS:
        entry["goals"] = goals(summary, kind)
    return entry


def report_data(scene: Scene, results: list[tuple[str, str, Generated]], timing: dict, files: dict) -> dict:
    spec = scene.spec
    return {
        "command": "setseq demo",
        "quick": bool(scene.settings.quick),
        "base": scene.base_arg,
        "random_base": scene.base.random,
        "concept": {"name": spec.name, "description": spec.description, "pattern": spec.pattern,
                    "motion": spec.motion, "background": spec.background},
        "prompts": {"stage1": P.static_prompt(spec), "stage2": P.full_prompt(spec)},
        "budget": X.describe_budget(scene.budget),
        "concept_files": {k: str(v) for k, v in files.items()},
        "timing": timing,
        "jobs": [job_entry(run, kind, g) for run, kind, g in results],
    }


def header(data: dict) -> list[str]:
    """The run in words: base, concept, prompts, budget, sampling, time."""
    b, c, t = data["budget"], data["concept"], data["timing"]
    lines = [f"# setseq demo: {c['name']}", ""]
    if data["random_base"]:
        lines += ["**Random base (smoke run): these numbers measure only that the machinery runs.**", ""]
    return lines + [
        f"- base: `{data['base']}`; concept: {c['description'] or c['pattern']} "
        f"(pattern {c['pattern']}, motion {c['motion']}, {c['background']} background)",
        f"- prompts: stage 1 `{data['prompts']['stage1']}`, stage 2 `{data['prompts']['stage2']}`",
        f"- personalization: {b['steps1']} + {b['steps2']} steps, rank {b['rank']} on "
        f"{X.describe_targets(b['targets'])}, lr {b['lr']:g}, token lr "
        f"{b['token_lr']:g}, batch {b['batch_size']}, prior {b['prior_count']} generations "
        f"({b['prior_per_batch']} per batch, weight {b['prior_weight']:g}, "
        f"{b['prior_pairs']} with two objects; {b.get('companions', 0)} ordinary objects stitched "
        f"beside it; the clip also on {b.get('backgrounds', 0)} other backgrounds); "
        "B-dropout 0.8 / 0.5, token masking 0.1, caption dropout 0.1",
        f"- sampling: {b['samples']} seeds per prompt; steps {b['sample_steps'] or 'base default'}, "
        f"guidance {b['guidance'] or 'base default'}",
        f"- time: personalize {', '.join(f'{k} {v:.0f} s' for k, v in t['personalize_s'].items())}; "
        f"generate {t['generate_s']:.0f} s; total {t['total_s']:.0f} s",
    ]


def goals_table(jobs: list[dict]) -> str:
    rows = [[j["run"], j["job"], g["goal"], fmt(g["value"]), f"{g['op']} {fmt(g['bound'])}",
             "pass" if g["pass"] else "MISS"]
            for j in jobs for g in j.get("goals", [])]
    return markdown_table(["run", "job", "goal", "measured", "needs", ""], rows)


def numbers_table(jobs: list[dict]) -> str:
    header = ["run", "job", "a", "b"] + [h for _, h in COLUMNS]
    rows = [[j["run"], j["job"], fmt(j["identity"]), fmt(j["motion"])]
            + [fmt_pm(j["summary"].get(k)) if k in j["summary"] else "" for k, _ in COLUMNS]
            for j in jobs]
    return markdown_table(header, rows)


def render_markdown(data: dict) -> str:
    jobs = data["jobs"]
    lines = header(data) + [
        "",
        "## Goals (issue 5), mean over seeds",
        "",
        goals_table(jobs),
        "",
        "## Every number, mean ± spread over seeds (floors beside)",
        "",
        numbers_table(jobs),
        "",
        "Floors: MSE of a flat video of the reference's background; trajectory error of always "
        "guessing the frame centre; crop cosine of the reference with its sprite flattened to its mean "
        "colour; a background name by chance 1/5; velocity correlation 0 for an unrelated motion. "
        "`base_adapter_off` is the base model with the trained tokens but no LoRA (identity = motion = 0). "
        "`ceiling / vae_roundtrip` is the reference encoded and decoded by the base's VAE: the best any "
        "generation in its latent space can score.",
        "",
        "## Prompts",
        "",
    ]
    return "\n".join(lines + [f"- {j['run']} / {j['job']}: `{j['prompt']}`" for j in jobs])


__all__ = ["GOAL_TEXT", "goals", "report_data", "render_markdown"]
