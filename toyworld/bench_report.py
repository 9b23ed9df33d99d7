"""The toyworld bench's report: every variant's runs pooled into one row (mean ± spread over concepts x
seeds), the VAE's ceiling and the floors below them, as a markdown table and its JSON data."""

from __future__ import annotations

from toyworld import experiment as X
from toyworld.report import fmt, fmt_pm, markdown_table, summarize

# (key in a run's record, header, source job)
COLUMNS = [
    ("mse", "MSE ↓", "recon"),
    ("id_crop", "ID crop ↑", "edit"),
    ("id", "ID colour ↑", "edit"),
    ("edit_background", "edit adherence ↑", "edit"),
    ("temporal_coherence", "TC ↑", "edit"),
    ("motion_fidelity", "motion fidelity ↑", "edit"),
    ("recon_motion_fidelity", "recon motion fidelity ↑", "recon"),
    ("recon_id_crop", "recon ID crop ↑", "recon"),
    ("clip_t", "C-T ↑", "edit"),  # only with --clip (local CLIP weights)
]
NO_CLIP = "not available (--clip)"
FLOORS = {  # column -> the record's value of its trivial answer
    "mse": "mse_floor",
    "id_crop": "id_crop_floor",
    "temporal_coherence": "reference_coherence",
    "recon_id_crop": "id_crop_floor",
    "clip_t": "clip_t_floor",
}
FIXED_FLOORS = {"edit_background": "0.2 (chance)", "motion_fidelity": "0", "recon_motion_fidelity": "0"}


def aggregate(records: list[dict], variants: list[X.Variant]) -> dict:
    """{variant: {metric: {"mean", "std", "n"}}} over (concept, seed) runs, plus the floors."""
    table = {}
    for v in variants:
        mine = [r["values"] for r in records if r["variant"] == v.key]
        table[v.key] = summarize(mine) if mine else {}
    floors = summarize([{k: r["values"][f] for k, f in FLOORS.items() if f in r["values"]} for r in records])
    ceiling = summarize([{k: v for k, v in r["values"].items() if k.startswith("vae_")} for r in records])
    return {"rows": table, "floors": floors, "ceiling": ceiling}


def table(data: dict) -> str:
    """A row per variant, then the VAE round trip of the reference (ceiling) and the floors."""
    header = ["method"] + [h for _, h, _ in COLUMNS] + ["train s"]
    rows = []
    for v in data["variants"]:
        row = data["table"]["rows"].get(v["key"], {})
        secs = [r["train_seconds"] for r in data["records"] if r["variant"] == v["key"]]
        rows.append([v["label"]]
                    + [fmt_pm(row.get(k)) if k in row or k != "clip_t" else NO_CLIP for k, _, _ in COLUMNS]
                    + [fmt(sum(secs) / len(secs)) if secs else "n/a"])
    floors = data["table"]["floors"]
    ceil = {k[4:]: v for k, v in data["table"].get("ceiling", {}).items()}
    rows.append(["VAE round trip of the reference (ceiling)"]
                + [fmt(ceil[k.removeprefix("recon_")]["mean"]) if k.removeprefix("recon_") in ceil else "-"
                   for k, _, _ in COLUMNS]
                + [""])
    rows.append(["floor (trivial answer)"]
                + [fmt(floors[k]["mean"]) if k in floors else FIXED_FLOORS.get(k, "-") for k, _, _ in COLUMNS]
                + [""])
    return markdown_table(header, rows)


def setup(data: dict) -> list[str]:
    """The bench in words: base, concepts, seeds, sampling, every row's training, time."""
    b, records = data["budget"], data["records"]
    return [
        f"- base: `{data['base']}`"
        + (" (**random: smoke run, numbers meaningless**)" if data["random_base"] else ""),
        f"- concepts: {', '.join(data['concepts'])}; training seeds: {data['seeds']}; "
        f"{b['samples']} generations per prompt and run (guidance {b['guidance'] or 'base default'}, "
        f"{b['sample_steps'] or 'base default'} steps); mean ± spread (std) over concept x seed runs",
        f"- every row: {b['steps1']} + {b['steps2']} steps (single-stage rows: "
        f"{b['steps1'] + b['steps2']} steps on clips), batch {b['batch_size']}, LoRA lr {b['lr']:g} "
        f"(AdamW 0.9/0.99, wd 0.01, clip 0.05), token lr {b['token_lr']:g}; rank {b['rank']} (LoRA-1: 1) "
        f"on {X.describe_targets(b['targets'])}; "
        f"textual inversion: tokens only at lr {b['ti_token_lr']:g}",
        "- ours: B-dropout 0.8 / 0.5, prior preservation "
        f"({b['prior_count']} base generations of world captions, {b['prior_pairs']} with two objects, "
        f"{b['prior_per_batch']} per batch, "
        f"weight {b['prior_weight']:g}), "
        "token masking 0.1, caption dropout 0.1, self-conditioning 0.5; the other rows: none of these "
        "(self-conditioning kept)",
        "- MSE and the recon columns: the training prompt; the other columns: the background edit "
        f"(`{records[0]['prompts']['edit'] if records else ''}`)",
        f"- wall time of this invocation: {data['seconds']:.0f} s; training time summed over runs: "
        f"{sum(r['train_seconds'] for r in records):.0f} s",
        *([f"- NOT RUN ({len(data['missing'])} planned runs, tabulated without them): "
           + ", ".join(data["missing"])] if data.get("missing") else []),
    ]


def render_markdown(data: dict) -> str:
    lines = [
        "# setseq bench toyworld: Tables 1-2 at toy scale",
        "",
        *setup(data),
        "",
        table(data),
        "",
        "Floors: MSE of a flat video of the reference's background; crop cosine of the reference with its "
        "sprite flattened to its mean colour; chance 1/5 for the background; TC floor = the reference's "
        "own TC (coherence depends on the motion, higher is not always better); velocity correlation 0; "
        "C-T floor: the unedited reference with the edit prompt.",
        *clip_note(data["records"]),
    ]
    return "\n".join(lines)


def clip_note(records: list[dict]) -> list[str]:
    """The C-T column's model and its ceiling-like reference point, when it was measured."""
    scored = [r for r in records if "clip_t_target" in r["values"]]
    if not scored:
        return []
    target = sum(r["values"]["clip_t_target"] for r in scored) / len(scored)
    models = sorted({r.get("clip", "?") for r in scored})
    return [f"C-T: CLIP at {', '.join(models)}, raw cosine of the edit prompt (placeholders dropped) and the "
            f"mean frame embedding; the world's own rendering of the edit scores {target:.3g}."]


__all__ = ["COLUMNS", "aggregate", "table", "render_markdown"]
