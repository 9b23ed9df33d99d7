"""The toy world generator: determinism, ground truth that agrees with the pixels, the held-out
split, dynamic concepts, and the model-facing tensor helpers."""

import time

import numpy as np
import pytest
import torch

from toyworld.concepts import (
    CONCEPT_MOTIONS,
    EXAMPLES_DIR,
    ConceptSpec,
    concept_prompt,
    list_concepts,
    load_concept,
    render_concept,
)
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    ToyWorldConfig,
    caption_of,
    from_model_video,
    generate,
    generate_batch,
    latent_tokens,
    split_of,
    to_model_video,
)


@pytest.fixture(scope="module")
def clips():
    return generate(96, seed=11)


def test_same_seed_same_clips_and_other_seed_differs():
    a, b, c = generate_batch(24, seed=3), generate_batch(24, seed=3), generate_batch(24, seed=4)
    assert np.array_equal(a.video, b.video) and a.captions == b.captions
    assert np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.video, c.video)


def test_chunked_rendering_matches_whole_batch():
    whole = generate_batch(20, seed=5, chunk=64).video
    assert np.array_equal(generate_batch(20, seed=5, chunk=7).video, whole)


def test_default_clip_is_80_latent_tokens_and_shapes_match():
    cfg = ToyWorldConfig()
    batch = generate_batch(4, seed=0, cfg=cfg)
    assert batch.video.shape == (4, 17, 64, 64, 3) and batch.video.dtype == np.uint8
    assert batch.masks.shape == (4, 2, 17, 64, 64)
    assert latent_tokens(cfg) == 80
    assert latent_tokens(ToyWorldConfig(frames=9, size=32, radius=5, travel=12, orbit_radius=6, pair_travel=4,
                                        pair_orbit_radius=2)) == 12


@pytest.mark.parametrize("kwargs", [{"frames": 16}, {"size": 60}, {"radius": 20}, {"pair_travel": 20},
                                    {"two_object_prob": 1.5}])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ToyWorldConfig(**kwargs)


def test_mask_pixels_have_the_object_colour_and_the_rest_is_background(clips):
    for clip in clips:
        covered = np.zeros(clip.video.shape[:3], bool)
        for obj in clip.objects:
            assert obj.masks.any(axis=(1, 2)).all(), f"object invisible in some frame: {clip.caption}"
            assert (clip.video[obj.masks] == obj.rgb).all()
            covered |= obj.masks
        assert (clip.video[~covered] == clip.background_rgb).all()


def test_mask_centroid_is_the_reported_position_within_half_a_pixel(clips):
    worst = 0.0
    for clip in clips:
        for obj in clip.objects:
            t, h, w = obj.masks.shape
            n = obj.masks.sum((1, 2))
            cx = (obj.masks.sum(1) * (np.arange(w) + 0.5)).sum(1) / n
            cy = (obj.masks.sum(2) * (np.arange(h) + 0.5)).sum(1) / n
            worst = max(worst, np.abs(np.stack([cx, cy], 1) - obj.positions).max())
    assert worst < 0.5, f"mask centroid is {worst:.2f} px from the reported position (tolerance 0.5)"


def test_two_object_scenes_keep_first_object_left_and_second_right(clips):
    pairs = [c for c in clips if len(c.objects) == 2]
    assert len(pairs) > 10
    for clip in pairs:
        assert not clip.objects[0].masks[..., 32:].any() and not clip.objects[1].masks[..., :32].any()
        assert clip.objects[0].colour != clip.objects[1].colour


def test_caption_names_the_ground_truth(clips):
    for clip in clips:
        objs = [(o.colour, o.shape, o.motion) for o in clip.objects]
        assert clip.caption == caption_of(clip.background, objs)
    assert clips[0].caption.startswith("a ") and clips[0].caption.endswith(" background")


def test_heldout_split_is_disjoint_from_train_and_uses_known_words():
    train, held = generate_batch(400, seed=1, split="train"), generate_batch(400, seed=1, split="heldout")
    assert not set(train.captions) & set(held.captions)
    for batch, name in ((train, "train"), (held, "heldout")):
        sc = batch.scenes
        for i in range(len(batch.captions)):
            k = 2 if sc.two[i] else 1
            assert split_of(sc.background[i], sc.colour[i, :k], sc.shape[i, :k], sc.motion[i, :k]) == name
    words = " ".join(train.captions).split()
    for vocab in (BACKGROUNDS, COLOURS, SHAPES):
        assert all(w in words for w in vocab)
    with pytest.raises(ValueError, match="split"):
        generate_batch(2, split="test")


def test_heldout_is_about_a_seventh_of_one_object_compositions():
    held = [split_of(b, [c], [s], [m]) == "heldout" for b in range(len(BACKGROUNDS))
            for c in range(len(COLOURS)) for s in range(len(SHAPES)) for m in range(len(MOTIONS))]
    assert 0.1 < np.mean(held) < 0.2


def test_model_video_round_trip():
    video = generate_batch(2, seed=0).video
    x = to_model_video(video)
    assert x.shape == (2, 3, 17, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(from_model_video(x), video)
    with pytest.raises(ValueError):
        to_model_video(video.astype(np.float32))


def test_generation_speed_is_reported():
    n = 256
    start = time.perf_counter()
    generate_batch(n, seed=0)
    rate = n / (time.perf_counter() - start)
    print(f"toy world: {rate:.0f} clips/s (17x64x64, one process)")
    assert rate > 20, f"generation slowed to {rate:.0f} clips/s"


# ---------------------------------------------------------------------------------------------
# Dynamic concepts


def test_at_least_three_example_concepts_load_with_unnameable_motions():
    names = list_concepts()
    assert len(names) >= 3
    specs = [load_concept(n) for n in names]
    assert all(s.motion in CONCEPT_MOTIONS and s.pattern != "solid" for s in specs)


def test_the_unseen_concepts_render_inside_the_frame_unlike_the_shipped_ones():
    unseen = sorted((EXAMPLES_DIR / "unseen").glob("*.toml"))
    assert len(unseen) >= 3
    specs = [load_concept(p) for p in unseen]
    shipped = [load_concept(n) for n in list_concepts()]
    for spec in specs:
        clip = render_concept(spec)[0]  # a path that leaves the frame raises here
        assert clip.video.shape[0] == ToyWorldConfig().frames
        assert spec.background != "black" and (spec.pattern, spec.motion, spec.background) not in {
            (s.pattern, s.motion, s.background) for s in shipped}


def test_unknown_concept_name_says_what_ships():
    with pytest.raises(FileNotFoundError, match="checker_eight"):
        load_concept("no_such_concept")


def test_bad_concept_file_raises_value_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('pattern = "checker"\ncolours = [[1, 2, 3], [4, 5, 6]]\nwobble = 3\n')
    with pytest.raises(ValueError, match="wobble"):
        load_concept(path)
    with pytest.raises(ValueError, match="finer"):
        ConceptSpec(name="x", pattern="stripes", colours=((0, 0, 0), (9, 9, 9)), cell=4)


def test_concept_prompts():
    spec = load_concept("checker_eight")
    assert concept_prompt(spec, motion=False) == "a [v] sprite on a gray background"
    assert concept_prompt(spec) == "a [v] sprite moving in [u] motion on a gray background"
    assert (concept_prompt(spec, background="blue", extra=("red", "square", "up"))
            == "a [v] sprite moving in [u] motion and a red square moves up on a blue background")


@pytest.mark.parametrize("name", ["checker_eight", "split_hop_spin", "stripes_stutter"])
def test_concept_uses_both_colours_and_centroid_matches(name):
    spec = load_concept(name)
    clip = render_concept(spec, seed=2)[0]
    obj = clip.objects[0]
    for colour in spec.colours:
        assert (clip.video[obj.masks] == colour).all(-1).sum() > 100
    assert (clip.video[~obj.masks] == clip.background_rgb).all()
    ys, xs = np.nonzero(obj.masks[0])
    assert np.abs(np.array([xs.mean(), ys.mean()]) + 0.5 - obj.positions[0]).max() < 0.5


def test_concept_on_another_background_keeps_the_sprite_pixels():
    spec = load_concept("checker_eight")
    home, away = render_concept(spec, seed=1)[0], render_concept(spec, seed=1, background="blue")[0]
    sprite = home.objects[0].masks
    assert np.array_equal(sprite, away.objects[0].masks)
    assert np.array_equal(home.video[sprite], away.video[sprite])
    assert (away.video[~sprite] == BACKGROUNDS["blue"]).all()


def test_concept_with_an_extra_object_adds_it_in_the_right_half():
    spec = load_concept("stripes_stutter")
    clip = render_concept(spec, seed=0, extra=("red", "circle", "up"))[0]
    assert len(clip.objects) == 2 and clip.objects[1].colour == "red"
    extra = clip.objects[1].masks
    assert extra.any(axis=(1, 2)).all() and not extra[..., :32].any()
    assert (clip.video[extra] == COLOURS["red"]).all()
    with pytest.raises(ValueError, match="colour"):
        render_concept(spec, extra=("plaid", "circle", "up"))


def test_concept_with_an_extra_object_moves_in_the_left_half_as_the_world_lays_out_pairs():
    spec = load_concept("stripes_stutter")  # alone it travels 24 px right across the frame centre
    alone = render_concept(spec, seed=0)[0].objects[0].positions
    sprite = render_concept(spec, seed=0, extra=("red", "circle", "up"))[0].objects[0]
    assert not sprite.masks[..., 32:].any() and sprite.masks.any(axis=(1, 2)).all()
    steps, alone_steps = np.diff(sprite.positions[:, 0]), np.diff(alone[:, 0])
    assert 0 < np.ptp(sprite.positions[:, 0]) < np.ptp(alone[:, 0])  # the path shrinks to fit the slot
    assert np.allclose(steps * (alone_steps.sum() / steps.sum()), alone_steps)  # same rhythm, scaled


def test_concept_that_leaves_the_frame_raises():
    spec = ConceptSpec(name="big", pattern="checker", colours=((0, 0, 0), (9, 9, 9)), amplitude=30.0)
    with pytest.raises(ValueError, match="amplitude"):
        render_concept(spec)
