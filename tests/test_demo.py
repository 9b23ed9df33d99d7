"""`setseq demo` (toyworld/demo.py, toyworld/experiment.py) and the experiment scores (toyworld/report.py).

The smoke run uses a random tiny base and a few steps: it proves every promised file is written,
not that personalization works (the real run's numbers are in its report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from setseq.cli import main as cli_main
from toyworld import experiment as X
from toyworld import prompts as P
from toyworld import report as R
from toyworld.concepts import load_concept, render_concept
from toyworld.world import BACKGROUNDS, COLOURS, ToyWorldConfig, caption_of

SPEC = load_concept("checker_eight")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(["demo", "--quick", "--base", "tiny", "--out", str(out), "--no-progress"])
    return out, code, buf.getvalue()


def test_demo_quick_writes_mp4_and_gif_per_video(demo):
    out, code, _ = demo
    assert code == 0
    mp4 = sorted(p.stem for p in (out / "videos").glob("*.mp4"))
    gif = sorted(p.stem for p in (out / "videos").glob("*.gif"))
    assert mp4 == gif and "reference" in mp4
    # reconstruction, both edits, both stylizations, the adapter switched off, and the no-prior ablation
    for stem in (
        "ours-recon-s0",
        "ours-edit_background-s0",
        "ours-edit_object-s0",
        "ours-style_identity_only-s0",
        "ours-style_half_identity-s0",
        "ours-base_adapter_off-s0",
        "ours_noprior-recon-s0",
        "ours_noprior-edit_background-s0",
    ):
        assert stem in mp4


def test_demo_contact_sheet_has_a_row_per_video_and_a_column_per_frame(demo):
    from PIL import Image

    out, _, _ = demo
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    rows = 3 + 1 + 9  # reference, two edit targets, the VAE round trip, nine generated videos
    from sample.media import LABEL_HEIGHT, SHEET_PAD

    assert sheet.shape[0] == SHEET_PAD + rows * (LABEL_HEIGHT + 64 + SHEET_PAD)
    assert sheet.shape[1] == SHEET_PAD + 17 * (64 + SHEET_PAD)


def test_demo_report_holds_metrics_beside_their_floors(demo):
    out, _, _ = demo
    data = json.loads((out / "report.json").read_text())
    jobs = {(j["run"], j["job"]): j for j in data["jobs"]}
    recon = jobs[("ours", "recon")]["summary"]
    for key in (
        "mse",
        "mse_floor",
        "trajectory_error",
        "centre_floor",
        "motion_fidelity",
        "id_crop",
        "id_crop_floor",
        "temporal_coherence",
    ):
        assert key in recon
    assert "edit_background" in jobs[("ours", "edit_background")]["summary"]
    assert "extra_adherence" in jobs[("ours", "edit_object")]["summary"]
    confined = jobs[("ours", "edit_object_region")]  # the same prompt, the concept confined to the left half
    assert confined["per_seed"] != jobs[("ours", "edit_object")]["per_seed"] and "goals" in confined
    assert {g["goal"] for g in jobs[("ours", "recon")]["goals"]} >= {"MSE below the flat-video floor"}
    md = (out / "report.md").read_text()
    assert "flat floor" in md and "centre floor" in md and "Random base" in md
    assert "mse" in jobs[("ceiling", "vae_roundtrip")]["summary"]  # the VAE's own ceiling beside the floors


def test_demo_prints_where_the_results_are_last(demo):
    out, _, printed = demo
    last = printed.strip().splitlines()[-3:]
    assert str(out / "contact_sheet.png") in last[1]
    assert str(out / "report.md") in last[2] and str(out / "report.json") in last[2]


def test_demo_without_a_committed_base_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(X, "DEFAULT_BASE", tmp_path / "missing")
    assert cli_main(["demo", "--out", str(tmp_path / "o")]) == 2
    assert "setseq pretrain --preset tiny" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_demo_on_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert cli_main(["demo", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


# ----------------------------------------------------------------------------------------- prompts


def test_prompts_follow_the_worlds_caption_template():
    assert P.full_prompt(SPEC) == "a [v] square moves [u] on a gray background"
    assert P.full_prompt(SPEC, extra=P.EXTRA) == (
        "a [v] square moves [u] and " + caption_of("gray", [P.EXTRA])
    )
    assert P.static_prompt(SPEC, "blue") == "a [v] square on a blue background"
    assert all(" | " in p for p in P.toy_prior_prompts())


def test_prior_pairs_are_two_object_world_captions_of_two_colours():
    one, mixed = P.toy_prior_prompts(8), P.toy_prior_prompts(8, pairs=3)
    assert mixed[:5] == one[:5]  # pairs are appended, the one-object prompts stay as they were
    for prompt in mixed[5:]:
        static, full = prompt.split(" | ")
        assert static.count(" and ") == 1 and full.count(" and ") == 1
        colours = [w for w in full.split() if w in COLOURS]
        assert len(colours) == 2 and colours[0] != colours[1]
    assert all(" and " not in p for p in one)


def test_demo_flags_reach_its_budget():
    import argparse

    from setseq.cmd_demo import register, settings_of

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    budget = settings_of(parser.parse_args(["demo", "--prior-pairs", "4", "--steps2", "50"])).toy_budget()
    assert (budget.prior_pairs, budget.steps2, budget.steps1) == (4, 50, X.ToyBudget().steps1)


# ------------------------------------------------------------------------------------------ scores


def test_reference_against_itself_scores_perfectly_and_beats_every_floor():
    ref = render_concept(SPEC)[0].video
    s = R.score_concept_video(ref, ref, backgrounds=BACKGROUNDS, colours=COLOURS, background="gray")
    assert s["mse"] == 0.0 < s["mse_floor"]
    assert s["trajectory_error"] == 0.0 < s["centre_floor"]
    assert s["motion_fidelity"] > 0.99 and s["edit_background"] == 1.0
    assert s["id_crop_min"] > 0.999 > s["id_crop_floor"]


def test_a_flat_video_scores_at_the_floor():
    ref = render_concept(SPEC)[0].video
    flat = np.broadcast_to(np.array(BACKGROUNDS["gray"], np.uint8), ref.shape).copy()
    s = R.score_concept_video(flat, ref, backgrounds=BACKGROUNDS, colours=COLOURS)
    assert s["mse"] == pytest.approx(s["mse_floor"], rel=1e-6)
    assert s["id_crop_min"] == 0.0 and s["detection"] == 0.0


def test_added_object_is_found_and_tracked_apart_from_the_sprite():
    world = ToyWorldConfig()
    ref = render_concept(SPEC, cfg=world)[0].video
    target = X.edit_targets(SPEC, world)["edit_object"]
    kw = dict(
        sprite_colours=SPEC.colours, extra_rgb=COLOURS["red"], extra_motion="up", backgrounds=BACKGROUNDS
    )
    good = R.score_with_extra(target, ref, target, **kw)
    assert good["extra_adherence"] == 1.0 and good["extra_error"] == 0.0
    assert good["trajectory_error"] == 0.0 and good["motion_fidelity"] > 0.99
    missing = R.score_with_extra(ref, ref, target, **kw)  # the sprite alone: no red square
    assert missing["extra_found"] == 0.0 and missing["extra_adherence"] == 0.0


def test_summaries_count_nans_instead_of_averaging_them():
    s = R.summarize([{"a": 1.0}, {"a": 3.0}, {"a": float("nan")}])
    assert s["a"] == {"mean": 2.0, "std": 1.0, "n": 3, "nan": 1}
    assert json.loads(json.dumps(R.clean_json({"x": float("nan")}))) == {"x": None}


def test_background_shift_reads_each_pattern_colour_of_a_rendered_sprite():
    from benchmarks.background_shift import sprite_colours

    spec = load_concept("stripes_stutter")
    for bg in ("black", "blue"):
        frames = render_concept(spec, background=bg)[0].video.astype(np.float64)
        _, parts = sprite_colours(frames, spec.colours)
        assert np.allclose(parts, spec.colours), (bg, parts)  # hard-edged stripes: exact colours
    flat = np.full((17, 64, 64, 3), 20.0)
    mean, parts = sprite_colours(flat, spec.colours)
    assert np.isnan(mean).all() and all(np.isnan(p).all() for p in parts)


def test_a_committed_preset_name_loads_its_weights_and_only_a_smoke_run_reads_it_as_random():
    from toyworld.runner import resolve_base_arg
    from weights.base import COMMITTED

    assert resolve_base_arg("tiny-conv", quick=False) == str(COMMITTED["tiny-conv"])
    assert resolve_base_arg("tiny", quick=False) == str(COMMITTED["tiny"])
    assert resolve_base_arg("tiny", quick=True) == "tiny"  # --quick: seconds on random weights
    assert resolve_base_arg("/some/folder", quick=False) == "/some/folder"
