"""Pixel instruments: right on ground-truth toy-world videos, wrong on perturbed ones, and floors
computed as defined. The generator's ground truth is used only to check them."""

import numpy as np
import pytest

from toyworld import instruments as ins
from toyworld.concepts import load_concept, render_concept
from toyworld.world import BACKGROUNDS, COLOURS, MOTIONS, generate, to_model_video

OPPOSITE = {"still": "still", "left": "right", "right": "left", "up": "down", "down": "up",
            "clockwise": "counterclockwise"}


@pytest.fixture(scope="module")
def clips():
    return generate(60, seed=21)


def _accuracy(videos, clips):
    return ins.attribute_accuracy(videos, [c.attributes() for c in clips], BACKGROUNDS, COLOURS, MOTIONS)


def test_clean_clips_read_back_every_attribute(clips):
    acc = _accuracy([c.video for c in clips], clips)
    for name, row in acc.items():
        assert row["accuracy"] == 1.0, f"{name}: {row}"
        assert row["majority"] < 0.5 and row["uniform"] <= 1 / 3


def _blur(video):  # a [1, 4, 6, 4, 1] / 16 blur over H and W, as a decoder might soften edges
    taps = np.array([1, 4, 6, 4, 1]) / 16
    x = video.astype(np.float64)
    for axis in (1, 2):
        x = sum(np.roll(x, i - 2, axis=axis) * tap for i, tap in enumerate(taps))
    return x.round().astype(np.uint8)


def test_noisy_and_blurred_clips_still_read_back(clips):
    rng, some = np.random.default_rng(0), clips[:30]
    noisy = [np.clip(c.video + rng.normal(0, 16, c.video.shape), 0, 255).astype(np.uint8) for c in some]
    for videos in (noisy, [_blur(c.video) for c in some]):
        acc = _accuracy(videos, some)
        assert all(row["accuracy"] >= 0.95 for row in acc.values()), acc


def test_swapped_sides_fail_pair_colour_only(clips):
    # Mirrored left-right, a two-object scene has each colour on the other side: pair colour is right only
    # where both objects share a colour; one-object clips keep theirs.
    acc = _accuracy([c.video[:, :, ::-1].copy() for c in clips], clips)
    pairs = [c for c in clips if len(c.objects) == 2]
    same = sum(2 * (c.objects[0].colour == c.objects[1].colour) for c in pairs) / (2 * len(pairs))
    assert pairs and acc["pair_colour"]["accuracy"] == same < 0.5, acc["pair_colour"]
    singles = _accuracy([c.video[:, :, ::-1].copy() for c in clips if len(c.objects) == 1],
                        [c for c in clips if len(c.objects) == 1])
    assert singles["colour"]["accuracy"] == 1.0 and singles["pair_colour"]["n"] == 0


def test_model_tensor_input_reads_the_same(clips):
    clip = clips[0]
    got = ins.measure(to_model_video(clip.video)[0], len(clip.objects), BACKGROUNDS, COLOURS)
    assert got["background"] == clip.background
    assert [o["colour"] for o in got["objects"]] == [o.colour for o in clip.objects]
    with pytest.raises(ValueError, match="shape"):
        ins.as_frames(np.zeros((3, 4, 4), np.uint8))


def test_recoloured_object_reads_the_wrong_colour(clips):
    names = list(COLOURS)
    videos = []
    for clip in clips:
        video = clip.video.copy()
        for obj in clip.objects:
            video[obj.masks] = COLOURS[names[(names.index(obj.colour) + 1) % len(names)]]
        videos.append(video)
    acc = _accuracy(videos, clips)
    assert acc["colour"]["accuracy"] == 0.0 and acc["shape"]["accuracy"] == 1.0


def test_recoloured_background_reads_the_wrong_background(clips):
    names = list(BACKGROUNDS)
    videos = []
    for clip in clips:
        video = clip.video.copy()
        covered = np.any([o.masks for o in clip.objects], axis=0)
        video[~covered] = BACKGROUNDS[names[(names.index(clip.background) + 1) % len(names)]]
        videos.append(video)
    assert _accuracy(videos, clips)["background"]["accuracy"] == 0.0


def test_time_reversed_clip_reads_the_opposite_motion(clips):
    for clip in clips:
        got = ins.measure(clip.video[::-1], len(clip.objects), BACKGROUNDS, COLOURS)
        want = [OPPOSITE[o.motion] for o in clip.objects]
        assert [o["motion"] for o in got["objects"]] == want, clip.caption


def test_frame_shuffled_clip_loses_motion_and_velocity(clips):
    rng = np.random.default_rng(1)
    moving = [c for c in clips if len(c.objects) == 1 and c.objects[0].motion != "still"]
    right, corr, jumps, coherent = 0, [], [], []
    for clip in moving:
        video = clip.video[rng.permutation(len(clip.video))]
        traj = ins.trajectory(ins.as_frames(video))[0]
        right += ins.classify_motion(traj) == clip.objects[0].motion
        corr.append(ins.velocity_correlation(traj, clip.objects[0].positions))
        jumps.append(ins.max_jump(traj))
        coherent.append(ins.temporal_coherence(ins.as_frames(video))
                        < ins.temporal_coherence(ins.as_frames(clip.video)))
    assert right / len(moving) < 0.3
    assert np.mean(corr) < 0.3
    assert np.median(jumps) > 10.0  # clean clips step at most 4.7 px a frame (orbits), 1.5 px (lines)
    assert np.mean(coherent) > 0.9


def test_clean_trajectory_matches_ground_truth(clips):
    for clip in clips:
        traj = ins.trajectory(ins.as_frames(clip.video), len(clip.objects))
        for k, obj in enumerate(clip.objects):
            # a hard-edged shape's centroid is off by up to 0.5 px per axis
            assert ins.trajectory_error(traj[k], obj.positions) < 0.71
            assert ins.max_jump(traj[k]) < 6.0  # the fastest path, a one-object orbit, is 4.7 px a frame
            if obj.motion != "still":  # whole-pixel steps keep it below 1 (slow two-object clips most)
                floor = 0.98 if len(clip.objects) == 1 else 0.85
                assert ins.velocity_correlation(traj[k], obj.positions) > floor


def test_trajectory_error_velocity_correlation_and_centre_floor_by_hand():
    ref = np.stack([np.arange(5.0) * 2 + 10, np.full(5, 32.0)], 1)  # moving right along y = 32
    assert ins.trajectory_error(ref + [3.0, 4.0], ref) == pytest.approx(5.0)
    assert ins.velocity_correlation(ref + [3.0, 4.0], ref) == pytest.approx(1.0)
    assert ins.velocity_correlation(ref[::-1], ref) == pytest.approx(-1.0)
    assert ins.centre_guess_error(ref, 64, 64) == pytest.approx(np.mean(np.abs(ref[:, 0] - 32)))
    assert ins.max_jump(ref) == pytest.approx(2.0)
    gone = ref.copy()
    gone[2] = np.nan
    assert ins.trajectory_error(gone, ref) == pytest.approx(0.0) and ins.detection_rate(gone) == 0.8


def test_mse_and_flat_video_floor(clips):
    clip = clips[0]
    assert ins.mse(clip.video, clip.video) == 0.0
    flat = np.broadcast_to(clip.background_rgb, clip.video.shape).astype(np.uint8)
    floor = ins.flat_video_mse(clip.video)
    assert floor == pytest.approx(ins.mse(flat, clip.video), rel=1e-6)
    assert floor > 0.01
    with pytest.raises(ValueError, match="shapes"):
        ins.mse(clip.video, clip.video[:-1])


def test_chance_rates():
    rates = ins.chance_rates(["a", "a", "a", "b"], n_classes=4)
    assert rates == {"uniform": 0.25, "majority": 0.75}


def test_unnameable_concept_motions_are_not_vocabulary_motions():
    for name in ("checker_eight", "split_hop_spin"):
        clip = render_concept(load_concept(name))[0]
        traj = ins.trajectory(ins.as_frames(clip.video))[0]
        assert ins.classify_motion(traj) == "other", name
        assert ins.trajectory_error(traj, clip.objects[0].positions) < 0.5


def test_concept_trajectory_beats_centre_floor_only_when_right():
    spec = load_concept("checker_eight")
    ref = render_concept(spec, seed=0)[0].objects[0].positions
    same = ins.trajectory(ins.as_frames(render_concept(spec, seed=1)[0].video))[0]
    wrong = ins.trajectory(ins.as_frames(render_concept(spec, seed=1, motion="left")[0].video))[0]
    floor = ins.centre_guess_error(ref, 64, 64)
    assert ins.trajectory_error(same, ref) < 0.3 * floor < ins.trajectory_error(wrong, ref)
    assert ins.velocity_correlation(same, ref) > 0.95 > 0.5 > ins.velocity_correlation(wrong, ref)


def test_appearance_similarity_tells_concepts_apart():
    def descriptors(spec, **kw):
        frames = ins.as_frames(render_concept(spec, **kw)[0].video)
        mask = ins.object_masks(frames)[0]
        return ins.colour_histogram(frames, mask), ins.object_crops(frames, mask)

    checker, stripes = load_concept("checker_eight"), load_concept("stripes_stutter")
    ref_h, ref_c = descriptors(checker)
    moved_h, moved_c = descriptors(checker, background="blue", seed=3)
    other_h, other_c = descriptors(stripes, background="gray")
    assert ins.appearance_similarity(ref_h, moved_h) > 0.95 > 0.2 > ins.appearance_similarity(ref_h, other_h)
    assert ins.crop_similarity(ref_c, moved_c) > 0.9 > ins.crop_similarity(ref_c, other_c)


def test_two_object_reads_need_the_object_count():
    with pytest.raises(ValueError, match="n_objects"):
        ins.object_masks(np.zeros((1, 8, 8, 3), np.float32), n_objects=3)


def test_compare_to_reference_beats_floors_for_the_concept_and_not_for_a_wrong_one():
    spec = load_concept("checker_eight")
    ref = render_concept(spec, seed=0)[0].video
    good = ins.compare_to_reference(render_concept(spec, seed=5)[0].video, ref, BACKGROUNDS)
    bad = ins.compare_to_reference(render_concept(load_concept("split_hop_spin"), seed=5)[0].video, ref)
    assert good["background"] == "gray" and good["detection"] == 1.0
    assert good["mse"] < good["mse_floor"] and good["trajectory_error"] < 0.3 * good["centre_floor"]
    assert good["velocity_correlation"] > 0.95 and good["appearance"] > 0.95
    assert bad["mse"] > bad["mse_floor"] and bad["trajectory_error"] > bad["centre_floor"]
    # the two sprites share their orange cells, so colour alone half-matches; the crop does not
    assert bad["velocity_correlation"] < 0.5 and bad["appearance"] < 0.6 and bad["crop_similarity"] < 0.5
