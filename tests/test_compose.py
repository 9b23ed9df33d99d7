"""`setseq bench compose` (toyworld/compose_bench.py, compose.py): composition of two toy concepts
by joint training with and without stitched pairs and by post-hoc mixing, measured per half.
The metrics are checked on the world's own renderings; one smoke bench runs on a random tiny base."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest

from lora.concept import load_concept as load_concept_file
from setseq.cli import main as cli_main
from toyworld import compose as C
from toyworld.compose_protocol import SCENE, protocol_summary
from toyworld.concepts import EXAMPLES_DIR, load_concept
from toyworld.world import ToyWorldConfig, caption_of

WORLD = ToyWorldConfig()
A, B = "checker_eight", "split_hop_spin"


@pytest.fixture(scope="module")
def pair():
    a, b = load_concept(A), load_concept(B)
    refs = tuple(C.Reference.of(C.X.reference_clip(s, WORLD).video) for s in (a, b))
    return a, b, refs


# ------------------------------------------------------------------------------------------ metrics


def test_leakage_scores_a_correct_composition_as_not_leaking(pair):
    a, b, (ref_a, ref_b) = pair
    s = C.score_composition(C.render_pair(a, b, WORLD), ref_a, ref_b)
    assert s["a_crop_margin"] > 0.5 and s["b_crop_margin"] > 0.5  # own >> other on both halves
    assert s["a_colour_margin"] > 0.3 and s["b_colour_margin"] > 0.3
    assert s["sides_right"] == 1.0


def test_leakage_scores_swapped_halves_as_leaking(pair):
    a, b, (ref_a, ref_b) = pair
    s = C.score_composition(C.render_pair(b, a, WORLD), ref_a, ref_b)  # B on the left, A on the right
    assert s["a_crop_margin"] < -0.5 and s["b_crop_margin"] < -0.5
    assert s["a_id_crop_other"] > s["a_id_crop"] and s["b_id_crop_other"] > s["b_id_crop"]
    assert s["sides_right"] == 0.0


def test_leakage_flags_the_half_that_took_the_other_identity(pair):
    a, _, (ref_a, ref_b) = pair
    s = C.score_composition(C.render_pair(a, a, WORLD), ref_a, ref_b)  # A twice: the right half leaked
    assert s["a_crop_margin"] > 0.5 and s["b_crop_margin"] < -0.5 and s["sides_right"] == 0.0


def test_composed_motion_matches_its_own_concept(pair):
    a, b, (ref_a, ref_b) = pair
    s = C.score_composition(C.render_pair(a, b, WORLD), ref_a, ref_b)
    assert s["a_motion"] > 0.9 and s["b_motion"] > 0.9  # shrunk x offsets: the per-axis score ignores scale


def test_motion_match_is_free_of_translation_and_scale_and_zero_when_still():
    t = np.linspace(0, 1, 17)
    ref = np.stack([32 + 12 * np.sin(2 * np.pi * t), 32 + 6 * np.sin(4 * np.pi * t)], 1)
    moved = np.stack([16 + 3 * (ref[:, 0] - 32), ref[:, 1] - 5], 1)
    assert C.motion_match(moved, ref) == pytest.approx(1.0, abs=1e-9)
    assert C.motion_match(np.full_like(ref, 20.0), ref) == 0.0
    assert np.isnan(C.motion_match(np.full_like(ref, np.nan), ref))


def test_composition_prompt_follows_the_worlds_two_object_grammar(pair):
    a, b, _ = pair
    prompt = C.composition_prompt(a, b)
    assert prompt == "a [v1] square moves [u1] and a [v2] circle moves [u2] on a gray background"
    for token, word in (("[u1]", "left"), ("[u2]", "up"), ("[v1]", "red"), ("[v2]", "cyan")):
        prompt = prompt.replace(token, word)
    words = prompt
    assert words == caption_of("gray", [("red", "square", "left"), ("cyan", "circle", "up")])


# ------------------------------------------------------------------------------------------ the bench


def bench(out, *extra) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(["bench", "compose", "--quick", "--base", "tiny", "--out", str(out), "--no-progress",
                         *extra])
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compose")
    code, printed = bench(out)
    return out, code, printed


def test_quick_bench_writes_every_methods_rows(smoke):
    out, code, printed = smoke
    assert code == 0
    assert (out / "compose.png").stat().st_size > 0
    data = json.loads((out / "compose.json").read_text())
    assert data["pair"] == [A, B]
    for m in C.METHODS:
        jobs = data["table"]["rows"][m.key]
        want = {"compose", "compose_ba", "scene", "scene_ba", "alone_a", "alone_b"}
        want |= {"single_a", "single_b"} if not m.joint else set()
        assert set(jobs) == want
        for key in ("a_id_crop", "a_id_crop_other", "a_crop_margin", "b_motion", "sides_right"):
            assert jobs["compose"][key]["n"] == C.QUICK.samples
    md = (out / "compose.md").read_text()
    for text in [m.label for m in C.METHODS] + ["floor: base model, nearest words", "ID crop other (leak)",
                                                "A left, B right, new scene", "background right",
                                                "(ceiling)", "single-concept baseline"]:
        assert text in md
    assert printed.rstrip().splitlines()[-1].startswith("json: ") and "compose.json" in printed


def test_methods_train_what_they_say(smoke):
    work = smoke[0] / "work"
    stitched = load_concept_file(work / "joint+stitch-s0" / "joint.safetensors")
    plain = load_concept_file(work / "joint-s0" / "joint.safetensors")
    assert set(stitched.tokens) == set(plain.tokens) == {"[v1]", "[u1]", "[v2]", "[u2]"}
    assert stitched.train_config["stitch_prob"] == C.STITCH_PROB and plain.train_config["stitch_prob"] == 0
    assert stitched.train_config["pair_layout"] == "halves"  # the tiny base's own two-object layout
    assert any(not np.array_equal(stitched.lora[k].numpy(), plain.lora[k].numpy()) for k in plain.lora)
    assert plain.train_config["steps2"] == 2 * C.QUICK.steps2  # joint: one run's steps per concept
    assert stitched.train_config["steps2"] == 2 * round(C.QUICK.steps2 * C.STITCH_STAGE2)  # pairs on top
    single_a = load_concept_file(work / "post-hoc-s0" / f"single-{A}.safetensors")
    single_b = load_concept_file(work / "post-hoc-s0" / f"single-{B}.safetensors")
    assert set(single_a.tokens) == {"[v1]", "[u1]"} and set(single_b.tokens) == {"[v2]", "[u2]"}
    assert single_a.train_config["steps2"] == C.QUICK.steps2


def test_a_rerun_reuses_finished_runs(smoke):
    out = smoke[0]
    saved = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    code, printed = bench(out)
    assert code == 0 and len(saved) == len(C.METHODS) + 1  # + the floors
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    assert "training)" not in printed


def test_a_rerun_that_only_samples_differently_reuses_the_trained_concepts(smoke, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)
    files = {p: p.stat().st_mtime_ns for p in (out / "work").glob("*/*.safetensors")}
    assert len(files) == 4  # joint+stitch, joint, post-hoc's two single runs
    code, printed = bench(out, "--guidance", "3")
    assert code == 0 and "(trained concepts reused)" in printed and "s training)" not in printed
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing retrained
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*-s0.json")]
    assert len(runs) == len(C.METHODS) and all(r["key"]["budget"]["guidance"] == 3 for r in runs)
    # a change to training is not a change to sampling: it trains again
    code, printed = bench(out, "--variants", "joint", "--lr", "0.002")
    assert code == 0 and "s training)" in printed and "reused" not in printed


def test_regions_confine_each_single_run_to_its_half_in_the_compositions_only(tmp_path):
    code, _ = bench(tmp_path, "--variants", "post-hoc,post-hoc+regions")
    assert code == 0
    plain, confined = (json.loads((tmp_path / "runs" / f"{k}-s0.json").read_text())
                       for k in ("post-hoc", "post-hoc+regions"))
    for f, g in zip(plain["concept_files"], confined["concept_files"], strict=True):  # the same two runs
        a, b = load_concept_file(f), load_concept_file(g)
        assert all(np.array_equal(a.lora[k].numpy(), b.lora[k].numpy()) for k in a.lora)
    videos = [np.load(tmp_path / "runs" / f"{k}-s0.npz") for k in ("post-hoc", "post-hoc+regions")]
    assert np.array_equal(videos[0]["alone_a"], videos[1]["alone_a"])  # a concept alone: not confined
    assert not np.array_equal(videos[0]["compose"], videos[1]["compose"])
    jobs = C.Pair.make(load_concept(A), load_concept(B), WORLD, tmp_path).jobs((0,), regions=True)
    # A's adapter (applied first) confined to the half the prompt names A for
    assert jobs["compose"].regions == ((0, 0, 0.5, 1), (0.5, 0, 1, 1))
    assert jobs["compose_ba"].regions == ((0.5, 0, 1, 1), (0, 0, 0.5, 1)) and jobs["alone_a"].regions == ()


def test_dblora_joint_trains_both_concepts_in_one_stage_with_both_stages_steps(tmp_path):
    code, _ = bench(tmp_path, "--variants", "dblora+stitch")
    assert code == 0
    trained = load_concept_file(tmp_path / "work" / "dblora+stitch-s0" / "joint.safetensors")
    cfg = trained.train_config
    assert cfg["single_stage"] and list(cfg["stages"]) == [1] and cfg["prior_count"] == 0
    assert cfg["steps1"] == 2 * (C.QUICK.steps1 + round(C.QUICK.steps2 * C.STITCH_STAGE2))  # as joint+stitch
    assert trained.rank == 2 * C.QUICK.rank  # a joint run: each concept its own rank
    assert cfg["stitch_prob"] == C.STITCH_PROB and set(trained.tokens) == {"[v1]", "[u1]", "[v2]", "[u2]"}


def test_any_bench_row_trains_as_the_joint_default_but_ours_is_the_default_itself(tmp_path):
    methods = C.pick_methods("twostage+stitch,ours_noprior+stitch")
    assert [m.variant for m in methods] == ["twostage", "ours_noprior"]
    assert all(m.joint and m.stitch_prob == C.STITCH_PROB and m.stage2 == C.STITCH_STAGE2 for m in methods)
    for bad in ("ours+stitch", "nosuchrow+stitch"):
        with pytest.raises(ValueError, match="ROW\\+stitch"):
            C.pick_methods(bad)
    code, _ = bench(tmp_path, "--variants", "twostage+stitch")
    assert code == 0
    cfg = load_concept_file(tmp_path / "work" / "twostage+stitch-s0" / "joint.safetensors").train_config
    assert list(cfg["stages"]) == [1, 2] and cfg["prior_count"] == 0 and cfg["dropout2"] == 0
    assert cfg["stitch_prob"] == C.STITCH_PROB


def test_a_saved_run_still_fits_after_its_method_is_relabelled_or_gains_a_field():
    from toyworld.compose_bench import key_fits, method_key

    method = C.pick_methods("post-hoc")[0]
    key = {"base": "tiny", "seed": 0, "method": method_key(method)}
    older = {k: v for k, v in dataclasses.asdict(method).items() if k not in ("stage2", "regions", "variant")}
    assert key_fits(key)({"key": {**key, "method": {**older, "label": "reworded"}}})
    assert not key_fits(key)({"key": {**key, "method": {**older, "stitch_prob": 0.5}}})
    assert not key_fits(key)({"key": {**key, "method": {**older, "stage2": 2.0}}})


def test_a_joint_run_saved_at_one_concepts_rank_reruns_and_a_single_run_still_fits(tmp_path):
    from toyworld.compose_bench import ComposeBench, method_key

    bench_ = ComposeBench(tmp_path, None, None, C.QUICK, {"base": "tiny"}, progress=False)
    for key, joint in (("joint+stitch", True), ("post-hoc", False)):
        method = C.pick_methods(key)[0]
        before = {"key": {"base": "tiny", "seed": 0, "method": method_key(method)}}  # saved before the change
        assert bench_.planned(method, 0).fits(before) is not joint


@pytest.mark.parametrize("text, named", [(f"{A},nope", "nope"), (A, "two concepts"), (f"{A},{A}", "differ")])
def test_pair_is_validated_with_a_clear_error(tmp_path, capsys, text, named):
    assert cli_main(["bench", "compose", "--base", "tiny", "--pair", text, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "stripes_stutter" in err  # names the shipped choices
    assert not (tmp_path / "runs").exists()


def test_swapped_order_reads_concept_a_in_the_right_half(pair):
    a, b, (ref_a, ref_b) = pair
    s = C.score_composition(C.render_pair(b, a, WORLD), ref_a, ref_b, swapped=True)  # B left, A right
    assert s["a_crop_margin"] > 0.5 and s["b_crop_margin"] > 0.5 and s["sides_right"] == 1.0
    assert C.composition_prompt(a, b, swapped=True).startswith("a [v2] circle moves [u2] and a [v1] square")


def test_the_new_scene_is_a_background_neither_clip_has_and_is_read_from_pixels(pair, tmp_path):
    a, b, (ref_a, ref_b) = pair
    stutter = load_concept("stripes_stutter")
    assert (a.background, b.background, stutter.background) == ("gray", "gray", "black")
    assert C.scene_background(a, b) == C.scene_background(a, stutter) == "blue"
    assert C.scene_background(dataclasses.replace(a, background="blue"), stutter) == "green"
    jobs = C.Pair.make(a, b, WORLD, tmp_path).jobs((0,))
    assert jobs["scene"].prompt == C.composition_prompt(a, b).replace("gray background", "blue background")
    ba = jobs["scene_ba"].prompt
    assert ba.startswith("a [v2] circle") and ba.endswith(" blue background")
    on_blue = C.score_composition(C.render_pair(a, b, WORLD, "blue"), ref_a, ref_b, background="blue")
    assert on_blue["background_right"] == 1.0 and on_blue["sides_right"] == 1.0
    on_gray = C.score_composition(C.render_pair(a, b, WORLD), ref_a, ref_b, background="blue")
    assert on_gray["background_right"] == 0.0 and "background_right" not in C.score_composition(
        C.render_pair(a, b, WORLD), ref_a, ref_b)


def test_compose_with_repaints_never_shows_a_concept_the_new_scene(tmp_path):
    code, _ = bench(tmp_path, "--variants", "joint+stitch", "--backgrounds", "2")
    assert code == 0
    trained = load_concept_file(tmp_path / "work" / "joint+stitch-s0" / "joint.safetensors")
    backgrounds = [c["full_prompt"].rsplit(" on a ", 1)[1] for c in trained.train_config["concepts"]]
    # each concept: its own clip (gray) twice, then repaints on black and green; never the scene's blue
    assert backgrounds == (["gray background"] * 2 + ["black background", "green background"]) * 2
    assert set(trained.tokens) == {"[v1]", "[u1]", "[v2]", "[u2]"}
    record = json.loads((tmp_path / "runs" / "joint+stitch-s0.json").read_text())
    assert {s["background_right"] for s in record["scores"]["scene"]} <= {0.0, 1.0}
    assert "background_right" not in record["scores"]["compose"][0]


def test_every_shipped_pair_and_the_pooled_goals():
    assert C.pick_pairs("all") == [(A, B), (A, "stripes_stutter"), (B, "stripes_stutter")]
    good = {"a_crop_margin": 0.5, "b_crop_margin": 0.4, "a_colour_margin": 0.1, "b_colour_margin": 0.1,
            "a_motion": 0.9, "b_motion": 0.85}
    bad = {**good, "b_crop_margin": -0.2}
    rec = {"method": "joint+stitch", "scores": {"compose": [good] * 4, "compose_ba": [good] * 3 + [bad]}}
    s = protocol_summary({"x+y": {"methods": [{"key": "joint+stitch"}], "records": [rec]}})["joint+stitch"]
    assert s["n"] == 8 and s["both_right"] == {"compose": 1.0, "compose_ba": 0.75}
    assert not s["goal_margins"] and s["goal_motion"]  # 75% in one order misses the 80% goal
    # in a new scene a generation on the wrong background is not right, whatever its halves
    rec["scores"].update(scene=[{**good, "background_right": 1.0}] * 3 + [{**good, "background_right": 0.0}],
                         scene_ba=[{**bad, "background_right": 1.0}])
    scene = protocol_summary({"x+y": {"methods": [{"key": "joint+stitch"}], "records": [rec]}}, SCENE)
    s = scene["joint+stitch"]
    assert s["n"] == 5 and s["both_right"] == {"compose": 0.75, "compose_ba": 0.0}  # keyed as the orders
    assert s["background_right"] == pytest.approx(4 / 5) and not s["goal_margins"]


def test_each_pair_of_a_protocol_gets_a_folder_named_by_its_concepts():
    from toyworld.compose_bench import pair_folder

    toml = str(EXAMPLES_DIR / "unseen" / "split_eight_blue.toml")
    assert pair_folder(A, toml) == f"{A}+split_eight_blue"  # one folder under OUT, not OUT/examples/...
    with pytest.raises(FileNotFoundError, match="no concept file"):
        pair_folder(A, "no_such_concept")


def test_the_pooled_protocol_report_prints_as_setseq_bench_does(tmp_path):
    from toyworld.bench import summary
    from toyworld.compose_bench import protocol_report

    good = {"a_crop_margin": 0.5, "b_crop_margin": 0.4, "a_colour_margin": 0.1, "b_colour_margin": 0.1,
            "a_motion": 0.9, "b_motion": 0.85}
    rec = {"method": "joint+stitch", "scores": {"compose": [good] * 4, "compose_ba": [good] * 4}}
    data = protocol_report({"x+y": {"methods": [{"key": "joint+stitch"}], "records": [rec]}}, tmp_path)
    printed = summary(data)  # `setseq bench compose --pair all` ended in a KeyError here, after its runs
    assert "| joint+stitch | 8 | 1 | 1 |" in printed and str(tmp_path / "compose-all.md") in printed


def test_compose_methods_are_validated_with_a_clear_error():
    assert [m.key for m in C.pick_methods("joint,joint+stitch-sbs")] == ["joint", "joint+stitch-sbs"]
    with pytest.raises(ValueError, match="joint\\+stitch-squeeze"):
        C.pick_methods("joint,nope")
    share = C.pick_methods("joint+stitch-p75")[0]
    assert share.joint and share.stitch_prob == 0.75 and share.layout is None
    for bad in ("joint+stitch-p101", "joint+stitch-p", "joint+stitch-p5x"):
        with pytest.raises(ValueError, match="pNN"):
            C.pick_methods(bad)
