import dataclasses

import numpy as np
import pytest

from toyworld.backgrounds import background_colour, on_background, other_backgrounds
from toyworld.concepts import load_concept, render_concept
from toyworld.experiment import ToyBudget
from toyworld.world import BACKGROUNDS, ToyWorldConfig


def test_repainting_changes_the_background_and_keeps_every_object_pixel():
    spec = load_concept("stripes_stutter")
    clip = render_concept(spec, seed=0, cfg=ToyWorldConfig())[0].video
    own = np.asarray(BACKGROUNDS[spec.background], np.uint8)
    assert (background_colour(clip) == own).all()
    green = on_background(clip, BACKGROUNDS["green"])
    was_bg = (clip == own).all(-1)
    assert (green[was_bg] == np.asarray(BACKGROUNDS["green"], np.uint8)).all()
    assert (green[~was_bg] == clip[~was_bg]).all() and (~was_bg).any()
    # the same clip rendered on green by the world is what the repaint gives
    assert (green == render_concept(spec, seed=0, cfg=ToyWorldConfig(), background="green")[0].video).all()


def test_other_backgrounds_leave_out_the_clips_own_and_the_edits():
    assert other_backgrounds("black", 3, unseen=("blue",)) == ["gray", "green", "brown"]
    with pytest.raises(ValueError, match="only 3 other backgrounds"):
        other_backgrounds("black", 4, unseen=("blue",))
    with pytest.raises(ValueError, match="backgrounds must be 0 to 3"):
        ToyBudget(backgrounds=4)


def test_a_toy_run_trains_the_clip_and_its_repaints_as_one_concept(tmp_path):
    from lora.concept import load_concept as load_concept_file
    from toyworld import experiment as X

    spec = load_concept("stripes_stutter")
    budget = dataclasses.replace(X.QUICK, backgrounds=2)
    base = X.ToyBase("tiny", tmp_path / "base")
    clip = render_concept(spec, seed=0, cfg=ToyWorldConfig())[0].video
    video = X.write_lossless(tmp_path / "clip.mp4", clip)
    out, _ = X.personalize(base, spec, X.variants(budget)["ours"], budget, video, tmp_path)
    trained = load_concept_file(out)
    concepts = trained.train_config["concepts"]
    assert set(trained.tokens) == {"[v]", "[u]"}
    # the clip half of the items (once per repaint), then gray and green: not its own black, not blue
    assert [c["video"] for c in concepts[:2]] == [str(video)] * 2
    assert [c["full_prompt"].split(" on a ")[1] for c in concepts] == [
        "black background", "black background", "gray background", "green background"]
    assert trained.train_config["steps1"] == budget.steps1  # one concept's budget, however many clips
