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
