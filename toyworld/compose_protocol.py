"""The composition goals pooled over pairs (`setseq bench compose --pair all`): per method, over every
pair, training seed, sampling seed and both orders, the share of generations whose two halves both look
more like their own concept than the other (crop margin > 0), the mean margins and the motion."""

from __future__ import annotations

import math

import numpy as np

MARGIN_SHARE = 0.8  # goal: both halves' crop margins > 0 in >= 80% of generations, in each order
MOTION_GOAL = 0.8  # goal: per-half motion correlation
ORDERS = ("compose", "compose_ba")
SCENE = ("scene", "scene_ba")  # the same compositions on a background no training clip had


def generation_rows(records: list[dict], method: str, orders: tuple[str, str] = ORDERS) -> list[dict]:
    """One row per generation of `method` and order: both margins positive (and, in a new scene, the
    background the one asked for), each half's crop and colour margin and motion, keyed by the concept
    ('a', 'b') the half was asked to hold."""
    rows = []
    for r in (r for r in records if r["method"] == method):
        for job in orders:
            for s in r["scores"].get(job, []):
                bg = s.get("background_right", 1.0)  # asked for in a new scene only
                both = (s["a_crop_margin"] or 0) > 0 and (s["b_crop_margin"] or 0) > 0 and bg == 1.0
                row = {"order": orders.index(job), "both": float(both), "bg": bg}
                for h in ("a", "b"):
                    for k in ("crop_margin", "colour_margin", "motion"):
                        row[f"{h}_{k}"] = math.nan if s.get(f"{h}_{k}") is None else s[f"{h}_{k}"]
                rows.append(row)
    return rows


def _halves_mean(rows: list[dict], key: str) -> float:
    return float(np.nanmean([r[f"{h}_{key}"] for r in rows for h in ("a", "b")]))


def method_summary(rows: list[dict]) -> dict:
    by_order = {o: float(np.mean([r["both"] for r in rows if r["order"] == i] or [math.nan]))
                for i, o in enumerate(ORDERS)}
    motion = _halves_mean(rows, "motion")
    return {"n": len(rows), "both_right": by_order, "crop_margin": _halves_mean(rows, "crop_margin"),
            "colour_margin": _halves_mean(rows, "colour_margin"), "motion": motion,
            "background_right": float(np.mean([r["bg"] for r in rows])),
            "goal_margins": all(v >= MARGIN_SHARE for v in by_order.values()),
            "goal_motion": motion >= MOTION_GOAL}


def protocol_summary(per_pair: dict[str, dict], orders: tuple[str, str] = ORDERS) -> dict:
    """{method: method_summary} pooled over every pair's records (both orders keyed as ORDERS)."""
    methods = list(dict.fromkeys(m["key"] for d in per_pair.values() for m in d["methods"]))
    rows = {k: [row for d in per_pair.values() for row in generation_rows(d["records"], k, orders)]
            for k in methods}
    return {k: method_summary(r) for k, r in rows.items() if r}


def render_protocol(per_pair: dict[str, dict], summary: dict, scene: dict | None = None) -> str:
    """The pooled goals; `scene`: the same summary of the compositions in a new scene (protocol_summary
    over SCENE), a second table."""
    from toyworld.report import fmt, markdown_table

    def table(summary: dict, bg: bool) -> str:
        header = ["method", "generations", "both halves right: A left, B right", "B left, A right",
                  "crop margin", "colour margin", "motion",
                  f"goal: both right >= {MARGIN_SHARE:.0%} each order", f"goal: motion >= {MOTION_GOAL}"]
        header += ["background right"] if bg else []
        rows = [[k, str(s["n"]), fmt(s["both_right"]["compose"]), fmt(s["both_right"]["compose_ba"]),
                 fmt(s["crop_margin"]), fmt(s["colour_margin"]), fmt(s["motion"]),
                 "pass" if s["goal_margins"] else "MISS", "pass" if s["goal_motion"] else "MISS"]
                + ([fmt(s["background_right"])] if bg else []) for k, s in summary.items()]
        return markdown_table(header, rows)

    lines = ["# setseq bench compose: every pair, pooled", "",
             f"- pairs: {', '.join(per_pair)} (each pair's table, with its floors: OUT/<a>+<b>/compose.md)",
             "- pooled over pairs, training seeds, sampling seeds and both orders; margins own − other",
             "", "## In the stitched pairs' layout (each concept on its own clip's background)", "",
             table(summary, bg=False)]
    if scene:
        lines += ["", "## In a new scene (a background no training clip had)", "",
                  "Both halves right here also needs the background asked for.", "", table(scene, bg=True)]
    return "\n".join(lines)
