"""The compose bench's report: each method's composition per half (own identity, leakage, motion) and each
concept alone, pooled over seeds x generations, beside the floors and the world's own rendering; the
markdown page and the contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toyworld import experiment as X
from toyworld.compose import METHODS, MIN_MAX_LENGTH, STITCH_PROB, STITCH_STAGE2, Pair
from toyworld.report import fmt, fmt_pm, markdown_table, summarize

COMPOSE_COLUMNS = [  # (key suffix, header)
    ("id_crop", "ID crop own ↑"),
    ("id_crop_other", "ID crop other (leak) ↓"),
    ("crop_margin", "crop own − other ↑"),
    ("id_colour", "ID colour own ↑"),
    ("id_colour_other", "ID colour other (leak) ↓"),
    ("colour_margin", "colour own − other ↑"),
    ("motion", "motion ↑"),
    ("detection", "detected"),
]
ALONE_COLUMNS = [("mse", "MSE ↓")] + COMPOSE_COLUMNS


def pooled(records: list[dict], job: str) -> dict:
    """summarize() over every video of a job, pooled over the runs (training seeds x samples)."""
    nan = float("nan")  # a saved record holds None where a number was NaN (JSON has no NaN)
    return summarize([{k: nan if v is None else v for k, v in s.items()}
                      for r in records for s in r["scores"].get(job, [])])


def aggregate(records: list[dict], floor: dict, methods: tuple = METHODS) -> dict:
    rows = {}
    for m in methods:
        mine = [r for r in records if r["method"] == m.key]
        jobs = ("compose", "compose_ba", "scene", "scene_ba", "alone_a", "alone_b", "single_a", "single_b")
        rows[m.key] = {job: table for job in jobs if (table := pooled(mine, job))}
    words = {job: pooled([{"scores": floor["words"]}], job) for job in floor["words"]}
    return {"rows": rows, "words": words}


def setup(data: dict) -> list[str]:
    """The bench in words: base, seeds, every method's training, context, prompts, time."""
    b, fl = data["budget"], data["floors"]
    return [
        f"- base: `{data['base']}`"
        + (" (**random: smoke run, numbers meaningless**)" if data["random_base"] else ""),
        f"- training seeds: {data['seeds']}; {b['samples']} generations per prompt and run (guidance "
        f"{b['guidance'] or 'base default'}); mean ± spread "
        "(std) over every video, pooled over seeds x generations",
        f"- every method: the `ours` variant (ROW+stitch: that bench row), per concept {b['steps1']} + "
        f"{b['steps2']} steps, batch "
        f"{b['batch_size']}, rank {b['rank']} on {X.describe_targets(b['targets'])}, LoRA lr {b['lr']:g}, "
        f"token lr {b['token_lr']:g}, prior "
        f"{b['prior_count']} generations ({b['prior_per_batch']} per batch); joint runs train both "
        f"concepts for {2 * b['steps1']} + {2 * b['steps2']} steps at rank {2 * b['rank']} (post-hoc: two "
        f"runs of {b['steps1']} + {b['steps2']}); joint+stitch draws a stitched pair (layout "
        f"{b.get('pair_layout', 'side_by_side')}, both orders) on {STITCH_PROB:.0%} of its steps and trains "
        f"stage 2 {STITCH_STAGE2:g}x as long; each concept's clip also repainted onto "
        f"{b.get('backgrounds', 0)} other backgrounds (never the new scene's)",
        f"- T5 context {data['max_length']} tokens (at least {MIN_MAX_LENGTH}: a stitched prompt takes ~46)",
        f"- composition prompt: `{data['prompts']['compose']}`; swapped order: "
        f"`{data['prompts'].get('compose_ba', '-')}`; in a new scene: `{data['prompts'].get('scene', '-')}`; "
        f"alone: `{data['prompts']['alone_a']}`, "
        f"`{data['prompts']['alone_b']}`",
        f"- base-model floor prompts (nearest words, no concept): `{fl['words_prompts']['compose']}`; "
        f"`{fl['words_prompts']['alone_a']}`; `{fl['words_prompts']['alone_b']}`",
        f"- wall time of this invocation: {data['seconds']:.0f} s; training summed over runs "
        f"{sum(r['train_seconds'] for r in data['records']):.0f} s",
    ]


# (job, order, the halves in it: (key prefix of the concept asked for there, side))
ORDERS = (("compose", "A left, B right", (("a", "left"), ("b", "right"))),
          ("compose_ba", "B left, A right", (("b", "left"), ("a", "right"))),
          ("scene", "A left, B right, new scene", (("a", "left"), ("b", "right"))),
          ("scene_ba", "B left, A right, new scene", (("b", "left"), ("a", "right"))))


TARGET_SUFFIX = {"compose": "", "compose_ba": "_ba", "scene": "_scene"}  # job -> its floors' target keys


def half_rows(label: str, order: str, halves: tuple, cells, sides: str, tail: str, names: dict
              ) -> list[list[str]]:
    """Two rows, one per half; the label, order, both-sides-right and tail cells on the first."""
    return [[label if n == 0 else "", order if n == 0 else "", f"{side}: {names[half]}"] + cells(half)
            + ([sides, tail] if n == 0 else ["", ""]) for n, (half, side) in enumerate(halves)]


def sides_cell(table: dict) -> str:
    """Both sides right; in a new scene also whether the background is the one asked for."""
    bg = table.get("background_right")
    return fmt_pm(table.get("sides_right")) + (f"; background right {fmt(bg['mean'])}" if bg else "")


def method_rows(data: dict) -> list[list[str]]:
    """Per method and order, a row per half; both sides right and train seconds on the first."""
    names, rows = dict(zip("ab", data["pair"], strict=True)), []
    for m in data["methods"]:
        secs = [r["train_seconds"] for r in data["records"] if r["method"] == m["key"]]
        for job, order, halves in ORDERS:
            comp = data["table"]["rows"].get(m["key"], {}).get(job, {})
            if comp:
                label = m["label"] if job == "compose" else ""
                tail = fmt(sum(secs) / len(secs)) if secs and job == "compose" else ""
                rows += half_rows(label, order, halves,
                                  lambda h, c=comp: [fmt_pm(c.get(f"{h}_{k}")) for k, _ in COMPOSE_COLUMNS],
                                  sides_cell(comp), tail, names)
    return rows


def reference_rows(data: dict) -> list[list[str]]:
    """Per order: the base model's nearest-words floor, the world's rendering (target) and, A left, its
    VAE round trip (ceiling), a row per half; then the flat floors."""
    fl, names, rows = data["floors"], dict(zip("ab", data["pair"], strict=True)), []
    for job, order, halves in ORDERS:
        words = data["table"]["words"].get(job, {})
        if words:
            rows += half_rows("floor: base model, nearest words", order, halves,
                              lambda h, w=words: [fmt_pm(w.get(f"{h}_{k}")) for k, _ in COMPOSE_COLUMNS],
                              sides_cell(words), "", names)
        suffix = TARGET_SUFFIX.get(job)  # the floors render some orders only
        for label, key in (("world's rendering (target)", "target"),
                           ("its VAE round trip (ceiling)", "target_vae")):
            if suffix is not None and (src := fl.get(key + suffix)) is not None:
                rows += half_rows(label, order, halves,
                                  lambda h, x=src: [fmt(x.get(f"{h}_{k}")) for k, _ in COMPOSE_COLUMNS],
                                  fmt(src.get("sides_right")), "", names)
    flat = ["floor: flat colour / flat video", "", ""] + [
        f"{fmt(fl['flat_colour_a'])} / {fmt(fl['flat_colour_b'])}; flat video 0" if k == "id_crop" else
        ("0" if k in ("motion", "detection") else "-") for k, _ in COMPOSE_COLUMNS] + ["0", ""]
    return rows + [flat]


def composition_table(data: dict) -> str:
    header = ["method", "order", "half"] + [h for _, h in COMPOSE_COLUMNS] + ["both sides right", "train s"]
    return markdown_table(header, method_rows(data) + reference_rows(data))


def alone_table(data: dict) -> str:
    """Each concept generated alone per method (and with its own adapter only, post-hoc), then the floors
    and the reference clips themselves."""
    t, fl = data["table"], data["floors"]
    a_name, b_name = data["pair"]
    baseline = " (own adapter only: single-concept baseline)"
    rows = []
    for m in data["methods"]:
        row = t["rows"].get(m["key"], {})
        for job, name, what in (("alone_a", a_name, ""), ("alone_b", b_name, ""),
                                ("single_a", a_name, baseline), ("single_b", b_name, baseline)):
            if job in row:
                rows.append([m["label"], name + what] + [fmt_pm(row[job].get(k)) for k, _ in ALONE_COLUMNS])
    for job, name in (("alone_a", a_name), ("alone_b", b_name)):
        rows.append(["floor: base model, nearest words", name]
                    + [fmt_pm(t["words"][job].get(k)) for k, _ in ALONE_COLUMNS])
    for key, name in (("reference_a", a_name), ("reference_b", b_name)):
        rows.append(["floor: flat video (background colour)", name] + [fmt(fl[key]["mse_floor"])]
                    + ["0" if k in ("id_crop", "id_colour", "motion", "detection") else "-"
                       for k, _ in COMPOSE_COLUMNS])
    for key, name in (("reference_a", a_name), ("reference_b", b_name)):
        rows.append(["the reference clip itself", name] + [fmt(fl[key].get(k)) for k, _ in ALONE_COLUMNS])
    return markdown_table(["method", "concept"] + [h for _, h in ALONE_COLUMNS], rows)


def render_markdown(data: dict) -> str:
    a_name, b_name = data["pair"]
    lines = [
        f"# setseq bench compose: {a_name} (left) + {b_name} (right)",
        "",
        *setup(data),
        "",
        "## Composition: each half's object against its own concept and the other (leakage)",
        "",
        composition_table(data),
        "",
        "## Each concept alone (does composition training hurt it?)",
        "",
        alone_table(data),
        "",
        "Metrics: ID crop = cosine of frame-aligned 32 px object crops (pattern, orientation), ID colour = "
        "colour-histogram intersection; 'other' is the same against the other concept's reference (identity "
        "leakage), and own − other > 0 means the object looks more like its own concept. Motion = per-axis "
        "velocity correlation (stride 2) with the own reference trajectory, averaged over the axes the "
        "reference moves along (translation- and scale-free: a composed object traces a smaller path in its "
        "half). Halves: the left half's foreground (x < W/2) is the first-named concept, the right "
        "half's the second ('A left, B right', then the swapped prompt 'B left, A right'). 'both sides "
        "right': both halves' crop margins > 0. 'New scene': the same compositions on a background neither "
        "clip has (nor, with --backgrounds, any repaint): composing into a scene never trained, where the "
        "other orders are the stitched pairs' own layout. Floors: the base model without any concept, "
        "prompted with the nearest vocabulary words; the reference with its sprite flattened to its mean "
        "colour (flat-colour crop cosine); a flat video (no object) scores ID 0 and motion 0; MSE floor "
        "(in the JSON) = a flat video of the reference's background. The world's rendering of the "
        "composition (each sprite on its own path, x offsets shrunk to its half) shows what a perfect "
        "answer scores; its VAE round trip is the ceiling of any generation in the base's latent space.",
    ]
    if data.get("missing"):
        lines += ["", f"NOT RUN: {', '.join(data['missing'])}"]
    return "\n".join(lines)


def contact_sheet(out: Path, pair: Pair, videos: dict[str, dict[str, np.ndarray]]) -> Path:
    """References, the target, then per method its first composition / alone videos, then the floors."""
    from sample import media

    rows, labels = [pair.ref_a, pair.ref_b], [f"reference A: {pair.a.name}", f"reference B: {pair.b.name}"]
    fl = videos.get("floors", {})
    for key, label in (("target", "target: A left, B right (world rendering)"),
                       ("target_vae", "target, VAE round trip (ceiling)")):
        if key in fl:
            rows.append(fl[key])
            labels.append(label)
    for run, vids in videos.items():
        if run == "floors":
            continue
        for job, v in vids.items():
            rows.append(v)
            labels.append(f"{run} {job}")
    for key in ("words_compose", "words_alone_a", "words_alone_b"):
        if key in fl:
            rows.append(fl[key])
            labels.append(f"floor: base, nearest words, {key[6:]}")
    return media.write_contact_sheet(out / "compose.png", rows, labels)


__all__ = ["aggregate", "pooled", "render_markdown", "contact_sheet"]
