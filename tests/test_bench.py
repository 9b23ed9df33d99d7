"""`setseq bench toyworld` (toyworld/bench.py) and the personalization variants it compares
(train/config.py: single_stage, train_lora). One smoke bench on a random tiny base: 1 concept x
1 seed x 5 variants, a few steps each."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil

import pytest
import torch

from lora.concept import load_concept
from setseq.cli import main as cli_main
from toyworld import experiment as X
from train.config import ConceptSpec, PersonalizeConfig

ROWS = ("lora1", "dblora", "twostage", "ours", "textinv")


def bench(out, *extra) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(["bench", "toyworld", "--quick", "--base", "tiny", "--concepts", "1", "--seeds", "1",
                         "--out", str(out), "--no-progress", *extra])
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code, printed = bench(out)
    return out, code, printed


def concept_file(out, variant: str):
    return load_concept(out / "work" / f"checker_eight-s0-{variant}" / f"{variant}.safetensors")


def test_bench_table_has_every_row_and_column(smoke):
    out, code, _ = smoke
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data["table"]["rows"]) == set(ROWS)
    for row in data["table"]["rows"].values():
        for key in ("mse", "id_crop", "id", "edit_background", "temporal_coherence", "motion_fidelity"):
            assert key in row and row[key]["n"] == 1
    md = (out / "bench.md").read_text()
    labels = [v.label for v in X.variants(X.QUICK).values()]
    headers = ("MSE", "ID crop", "edit adherence", "TC", "motion fidelity", "floor (trivial answer)",
               "VAE round trip of the reference (ceiling)")
    for text in (*labels, *headers):
        assert text in md


def test_single_stage_rows_train_identity_coefficients_only(smoke):
    out = smoke[0]
    lora1, dblora = concept_file(out, "lora1"), concept_file(out, "dblora")
    assert lora1.rank == 1 and dblora.rank == X.QUICK.rank
    for c in (lora1, dblora):
        b1 = torch.cat([c.lora[k].flatten() for k in c.lora if k.endswith("lora_B1")])
        b2 = torch.cat([c.lora[k].flatten() for k in c.lora if k.endswith("lora_B2")])
        assert b1.abs().max() > 0 and b2.abs().max() == 0
        assert all(t.abs().max() > 0 for t in c.tokens.values())  # both [v] and [u] trained in one stage


def test_two_stage_rows_train_a_motion_residual(smoke):
    for variant in ("twostage", "ours"):
        c = concept_file(smoke[0], variant)
        assert max(c.lora[k].abs().max() for k in c.lora if k.endswith("lora_B2")) > 0


def test_textual_inversion_trains_tokens_and_no_lora(smoke):
    c = concept_file(smoke[0], "textinv")
    assert all(c.lora[k].abs().max() == 0 for k in c.lora if "lora_B" in k)
    assert all(t.abs().max() > 0 for t in c.tokens.values())


def test_a_rerun_reuses_finished_runs(smoke):
    out = smoke[0]
    saved = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    code, printed = bench(out)
    assert code == 0 and len(saved) == len(ROWS)
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    assert "training)" not in printed  # nothing trained again


def test_unknown_variant_exits_2_naming_the_choices(tmp_path, capsys):
    assert cli_main(["bench", "toyworld", "--base", "tiny", "--variants", "ours,lora9", "--out",
                     str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lora9" in err and "dblora" in err


def test_single_stage_needs_stage_one_only(tmp_path):
    with pytest.raises(ValueError, match="single_stage"):
        PersonalizeConfig(concepts=[ConceptSpec("v.mp4", "a [v]", "[u]")],
                          out=str(tmp_path / "c.safetensors"), single_stage=True)


def test_table_only_trains_nothing_and_names_the_missing_runs(tmp_path):
    code, _ = bench(tmp_path, "--table-only")
    assert code == 0 and not (tmp_path / "runs").exists()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["missing"] == [f"checker_eight-s0-{v}" for v in ROWS]
    assert "NOT RUN" in (tmp_path / "bench.md").read_text()


def test_concepts_can_be_named(tmp_path):
    code, printed = bench(tmp_path, "--concepts", "stripes_stutter", "--variants", "ours", "--table-only")
    assert code == 0
    assert json.loads((tmp_path / "bench.json").read_text())["concepts"] == ["stripes_stutter"]


def test_budget_flags_reach_the_budget_and_unset_ones_keep_defaults():
    from setseq.cmd_bench import budget_overrides, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", "toyworld", "--lr", "3e-4", "--steps2", "50"])
    assert budget_overrides(args) == {"lr": 3e-4, "steps2": 50}
    args = parser.parse_args(["bench", "toyworld", "--guidance", "1", "--sample-steps", "30"])
    assert budget_overrides(args) == {"guidance": 1.0, "sample_steps": 30}
    args = parser.parse_args(["bench", "toyworld", "--prior-pairs", "4"])
    assert budget_overrides(args) == {"prior_pairs": 4}


def test_prior_weight_flag_reaches_the_personalization_config(tmp_path, monkeypatch):
    import train.personalize as P
    from setseq.cmd_bench import budget_overrides, register
    from toyworld import experiment as X
    from train.config import ConceptSpec

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", "toyworld", "--prior-weight", "0.25"])
    budget = X.ToyBudget(**budget_overrides(args))
    seen = {}
    monkeypatch.setattr(P, "main", lambda cfg, base, sample_fn: seen.setdefault("cfg", cfg))
    base = type("Base", (), {"for_training": lambda self: None, "device": "cpu"})()
    concept = ConceptSpec(video="clip.mp4", prompt="a [v] square", motion_prompt="moves [u]")
    X.train_concepts(base, [concept], X.variants(budget)["ours"], budget, tmp_path / "c.safetensors",
                     tmp_path / "w", name="c", seed=0, progress=False)
    assert seen["cfg"].prior_weight == 0.25 and seen["cfg"].prior_count == budget.prior_count


def test_a_rerun_that_only_samples_differently_reuses_the_trained_concepts(smoke, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(smoke[0], out)  # copy2 keeps the mtimes: every concept file is older than its record
    stale = out / "work" / "checker_eight-s0-ours" / "ours.safetensors"
    future = stale.stat().st_mtime + 3600
    os.utime(stale, (future, future))  # as if a later run had trained it and died before its record
    kept = {p: p.stat().st_mtime_ns for p in (out / "work").glob("*/*.safetensors") if p != stale}
    code, printed = bench(out, "--guidance", "2")
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not trained again
    assert printed.count("trained concept reused") == len(ROWS) - 1
    assert "ours: " in printed and printed.count("s training)") == 1  # the stale one trained again
    data = json.loads((out / "bench.json").read_text())
    assert data["budget"]["guidance"] == 2 and all(r["budget"]["guidance"] == 2 for r in data["records"])


def test_records_saved_before_a_budget_field_existed_still_count(smoke, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(smoke[0], out)
    for path in (out / "runs").glob("*.json"):
        rec = json.loads(path.read_text())
        del rec["budget"]["prior_pairs"]  # as written before the field existed (its default: no pairs)
        path.write_text(json.dumps(rec))
    code, printed = bench(out)
    assert code == 0 and "training)" not in printed and "reused" not in printed


def test_records_saved_before_the_head_target_existed_train_again(smoke, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(smoke[0], out)
    for path in (out / "runs").glob("*-ours.json"):
        rec = json.loads(path.read_text())
        del rec["budget"]["targets"]  # as written before the field existed: the paper's targets, no head
        path.write_text(json.dumps(rec))
    code, printed = bench(out)
    assert code == 0 and printed.count("s training)") == 1


def test_lora_rows_adapt_the_output_head_and_the_extra_row_does_not(smoke, tmp_path):
    ours = concept_file(smoke[0], "ours")
    head_b = [ours.lora[k] for k in ours.lora if k.startswith("head.head.") and "lora_B" in k]
    assert head_b and max(b.abs().max() for b in head_b) > 0
    assert "ours_nohead" not in json.loads((smoke[0] / "bench.json").read_text())["table"]["rows"]
    code, _ = bench(tmp_path, "--variants", "ours_nohead")
    assert code == 0
    nohead = concept_file(tmp_path, "ours_nohead")
    assert nohead.lora and not any(k.startswith("head.") for k in nohead.lora)


def test_clip_t_column_is_not_available_without_weights_and_measured_with_them(smoke, clip_folder, tmp_path):
    assert (smoke[0] / "bench.md").read_text().count("| not available (--clip) |") == len(ROWS)
    out = tmp_path / "b"
    shutil.copytree(smoke[0], out)
    code, printed = bench(out, "--clip", str(clip_folder[0]))
    assert code == 0
    assert printed.count("trained concept reused") == len(ROWS)  # only scored again, not trained
    data = json.loads((out / "bench.json").read_text())
    for rec in data["records"]:
        v = rec["values"]
        assert all(-1 <= v[k] <= 1 for k in ("clip_t", "clip_t_floor", "clip_t_target"))
        assert rec["clip"] == str(clip_folder[0])
    md = (out / "bench.md").read_text()
    assert "not available (--clip)" not in md and "C-T: CLIP at" in md
    code, printed = bench(out, "--clip", str(clip_folder[0]))  # a rerun with the same CLIP redoes nothing
    assert code == 0 and "reused" not in printed and "training)" not in printed


def test_a_saved_run_is_keyed_on_the_bases_weights_not_the_path_that_named_them(tmp_path):
    from toyworld.runner import BASE_ID, base_key, same_key

    paths = {}
    for name in ("first", "moved", "retrained"):
        paths[name] = str(shutil.copytree(X.DEFAULT_BASE, tmp_path / name))
    dit = tmp_path / "retrained" / "dit.safetensors"
    dit.write_bytes(dit.read_bytes()[:-1] + b"\x01")  # one byte of one weight changed
    saved = base_key(paths["first"])
    assert saved[BASE_ID] and same_key(saved, base_key(paths["moved"]))  # another path to the same files
    assert not same_key(saved, base_key(paths["retrained"]))
    assert not same_key({**saved, BASE_ID: "0" * 64}, base_key(paths["first"]))  # retrained in place
    assert same_key({"base": paths["first"]}, base_key(paths["moved"]))  # saved before digests were kept
    assert same_key({"base": "tiny"}, base_key("tiny")) and not same_key({"base": "tiny"}, base_key("x"))


def test_records_saved_before_repaints_existed_read_as_the_clip_alone():
    assert X.ToyBudget().backgrounds == 3 and X.saved_budget({})["backgrounds"] == 0


def test_records_saved_before_the_frame_shift_existed_trained_frames_at_the_clips_shift():
    now = X.describe_budget(X.ToyBudget())
    before = {k: v for k, v in now.items() if k != "frame_time_shift"}
    assert now["frame_time_shift"] == 2.0 and X.saved_budget(before)["frame_time_shift"] is None
    assert X.training_budget(before) != X.training_budget(now)  # such a run trains again
    assert X.training_budget({**before, "frame_time_shift": 2.0}) == X.training_budget(now)
