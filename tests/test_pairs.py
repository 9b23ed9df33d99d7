"""Stitched pairs in the base's layout (train/pairs.py): both orders, the toy base's two-object
geometry (64x64, each clip in its half) and caption grammar, Wan's side-by-side form."""

from __future__ import annotations

import pytest
import torch

from toyworld import experiment as X
from toyworld.concepts import load_concept
from toyworld.world import ToyWorldConfig, caption_of, to_model_video
from train.pairs import PairLayout, background_colour, foreground, ordered_pairs, split_caption

WORLD = ToyWorldConfig()


def clip(name: str) -> torch.Tensor:
    return to_model_video(X.reference_clip(load_concept(name), WORLD).video)[0]  # (C, T, H, W)


def test_every_ordered_pair_puts_each_concept_in_both_slots():
    assert ordered_pairs(2) == [(0, 1), (1, 0)]
    pairs = ordered_pairs(3)
    assert len(pairs) == 6 and all((j, i) in pairs for i, j in pairs)


@pytest.mark.parametrize("fit", ["crop", "squeeze", "scale"])
def test_halves_keep_the_bases_frame_and_put_each_object_in_its_half(fit):
    left, right = clip("stripes_stutter"), clip("checker_eight")  # black and gray backgrounds
    video = PairLayout("halves", fit).video(left, right)
    assert video.shape == left.shape  # (C, T, 64, 64): the tiny base's own two-object frame
    bg = background_colour(left)
    assert torch.allclose(background_colour(video), bg)  # the right clip's gray keyed to the left's black
    fg = foreground(video, bg)  # (T, H, W)
    w = video.shape[-1]
    for half in (fg[..., : w // 2], fg[..., w // 2 :]):
        assert bool(half.flatten(1).any(1).all())  # an object in each half, every frame


@pytest.mark.parametrize("name", ["split_hop_spin", "checker_eight", "stripes_stutter"])
def test_crop_keeps_the_object_whole_and_its_vertical_motion(name):
    video = clip(name)
    w = video.shape[-1]
    placed = PairLayout("halves", "crop").video(video, video)
    bg = background_colour(video)
    whole, fg = foreground(video, bg), foreground(placed, bg)
    rows = torch.arange(video.shape[-2], dtype=torch.float32)[:, None]
    ys = lambda m: (m * rows).sum((1, 2)) / m.sum((1, 2))  # noqa: E731
    for half in (fg[..., : w // 2], fg[..., w // 2 :]):
        assert torch.equal(whole.sum((1, 2)), half.sum((1, 2)))  # every object pixel, every frame
        assert torch.allclose(ys(whole.float()), ys(half.float()))  # y motion as it was


def test_halves_prompt_is_the_worlds_two_object_caption():
    layout = PairLayout("halves")
    full = layout.prompt("a [v1] square moves [u1] on a gray background",
                         "a [v2] circle moves [u2] on a gray background")
    assert full == "a [v1] square moves [u1] and a [v2] circle moves [u2] on a gray background"
    words = full.replace("[v1]", "red").replace("[u1]", "left").replace("[v2]", "cyan").replace("[u2]", "up")
    assert words == caption_of("gray", [("red", "square", "left"), ("cyan", "circle", "up")])
    static = layout.prompt("a [v1] square on a black background", "a cyan circle on a gray background")
    assert static == "a [v1] square and a cyan circle on a black background"  # the left clip's background
    subject = "a [v1] square moves [u1] and a [v2] circle moves [u2]"
    assert split_caption(full) == (subject, "on a gray background")
    with pytest.raises(ValueError, match="caption grammar"):
        layout.prompt("A [v1] man dancing.", "a [v2] circle on a gray background")


def test_side_by_side_is_the_natural_language_form():
    layout = PairLayout("side_by_side")
    a, b = torch.zeros(3, 9, 16, 16), torch.ones(3, 5, 16, 16)
    assert layout.video(a, b).shape == (3, 5, 16, 32)
    text = layout.prompt("A [v1] man dancing.", "Ocean waves [v2].")
    assert text == "On the left, A [v1] man dancing. On the right, ocean waves [v2]."


def test_unknown_layout_or_fit_is_refused():
    with pytest.raises(ValueError, match="pair layout"):
        PairLayout("grid")
    with pytest.raises(ValueError, match="pair fit"):
        PairLayout("halves", "stretch")
