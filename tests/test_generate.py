"""Generation with concepts (sample/generate.py) and `setseq generate`, on a small random base.

The property "two concepts in one adapter do not disturb each other's tensors" is covered at the
layer level by tests/test_lora.py::test_two_concepts_do_not_disturb_each_other and
tests/test_concept_file.py::test_two_concepts_apply_side_by_side; here: two concept FILES mixed in
one video leave each other's outputs alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from lora.concept import base_identity, concept_from_model, load_concept, save_concept
from lora.inject import concept_state_dict, inject_lora
from model.config import PRESETS
from model.dit import DiT
from model.t5 import T5Encoder
from model.tokenizer import base_tokenizer
from model.vae import VAE
from sample import media
from sample.generate import (
    GenerateConfig,
    Pipeline,
    add_concept,
    generate,
    word_positions,
)
from setseq.cli import main as cli_main
from setseq.cmd_generate import parse_concept
from train.video import write_video
from weights.checkpoint import load_checkpoint, save_checkpoint

_TINY = PRESETS["tiny"]
SMALL = dataclasses.replace(
    _TINY, name="gen-test",
    dit=dataclasses.replace(_TINY.dit, dim=64, heads=2, layers=2, ffn_dim=128, rope_split=(12, 10, 10)),
    vae=dataclasses.replace(_TINY.vae, base_channels=8),
    t5=dataclasses.replace(_TINY.t5, layers=1),
)
GEN = GenerateConfig(frames=5, size=(32, 32), steps=3)
SHAPE_ARGS = ["--frames", "5", "--size", "32x32", "--steps", "2", "--no-progress"]


def random_dit(cfg=SMALL.dit, seed: int = 0) -> DiT:
    """A DiT whose zero-initialized output head is randomized like a trained one (a zero head would
    hide every LoRA and give velocity 0 whatever the input)."""
    torch.manual_seed(seed)
    dit = DiT(cfg)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)
    return dit


def make_concept_file(path, name: str, tokens: tuple[str, ...], base_name: str = "gen-test",
                      dit_cfg=SMALL.dit, seed: int = 1):
    """A concept with random B1, B2 (rank 4) and random token embeddings, saved to `path`."""
    dit = DiT(dit_cfg)
    torch.manual_seed(seed)
    inject_lora(dit, rank=4, name=name)
    with torch.no_grad():
        for key, t in concept_state_dict(dit, name).items():
            if "lora_B" in key:
                t.normal_(0, 0.2)
    embeds = {tok: torch.randn(SMALL.t5.dim) for tok in tokens}
    base = base_identity(random_dit(dit_cfg), base_name)  # the weights of the base in `files`
    concept = concept_from_model(dit, name, base, tokens=embeds,
                                 prompts={"static": f"a {tokens[0]} square."})
    save_concept(path, concept)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model_path):
    """A checkpoint folder of the small base (with its tokenizer) and concept files beside it."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    save_checkpoint(root / "base", SMALL, random_dit(), VAE(SMALL.vae), T5Encoder(SMALL.t5),
                    tokenizer_path=sp_model_path)
    other_dit = dataclasses.replace(SMALL.dit, layers=1)
    return {
        "base": root / "base",
        "square": make_concept_file(root / "square.safetensors", "square", ("[v]", "[u]")),
        "circle": make_concept_file(root / "circle.safetensors", "circle", ("[v2]", "[u2]"), seed=2),
        "clash": make_concept_file(root / "clash.safetensors", "clash", ("[v]", "[u3]"), seed=3),
        "other_base": make_concept_file(root / "other.safetensors", "other", ("[w]",), dit_cfg=other_dit),
        "root": root,
    }


def pipeline(files) -> Pipeline:
    m = load_checkpoint(files["base"])
    tokenizer = base_tokenizer(m.tokenizer_path, m.added_tokens, m.t5.token_embedding.weight.shape[0])
    return Pipeline(m.cfg, m.dit, m.vae, m.t5, tokenizer, name=m.cfg.name)


def sample(pipe: Pipeline, prompt: str = "a red square moving right.", **kw) -> torch.Tensor:
    return generate(pipe, prompt, dataclasses.replace(GEN, **kw), progress=False)


# ------------------------------------------------------------------------------------------ library


def test_sampling_is_deterministic_for_a_seed(files):
    pipe = pipeline(files)
    a, b, c = sample(pipe, seed=3), sample(pipe, seed=3), sample(pipe, seed=4)
    assert a.shape == (3, 5, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_zero_identity_and_motion_scales_reproduce_the_base_model(files):
    base = sample(pipeline(files))
    pipe = pipeline(files)
    add_concept(pipe, load_concept(files["square"]), identity=0.0, motion=0.0)
    assert torch.equal(sample(pipe), base)
    add_concept(pipe, load_concept(files["circle"]), identity=1.0, motion=1.0)  # a live concept does act
    assert (sample(pipe) - base).abs().max() > 1e-3


def test_identity_and_motion_scales_act_separately(files):
    videos = []
    for alpha, beta in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        pipe = pipeline(files)
        add_concept(pipe, load_concept(files["square"]), identity=alpha, motion=beta)
        videos.append(sample(pipe))
    assert min((videos[i] - videos[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3


def test_a_mixed_in_concept_at_zero_scale_leaves_the_other_concept_alone(files):
    alone = pipeline(files)
    add_concept(alone, load_concept(files["square"]))
    mixed = pipeline(files)
    add_concept(mixed, load_concept(files["square"]))
    adapter = add_concept(mixed, load_concept(files["circle"]), identity=0.0, motion=0.0)
    prompt = "a [v] square, [u] moving."
    assert torch.equal(sample(mixed, prompt), sample(alone, prompt))
    for name, key in (("square", "square"), (adapter, "circle")):  # each adapter holds its own file's tensors
        want = load_concept(files[key]).lora
        got = concept_state_dict(mixed.dit, name)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_concept_tokens_get_their_embeddings_in_the_t5_table(files):
    pipe = pipeline(files)
    concept = load_concept(files["square"])
    add_concept(pipe, concept)
    ids = pipe.tokenizer.added_tokens
    table = pipe.t5.token_embedding.weight
    assert ids["[v]"] >= SMALL.t5.vocab_size  # a fresh row after the table, not a trained one
    for tok, emb in concept.tokens.items():
        assert torch.equal(table[ids[tok]], emb)


def test_tokens_defined_by_two_concepts_are_refused(files):
    pipe = pipeline(files)
    add_concept(pipe, load_concept(files["square"]))
    with pytest.raises(ValueError, match=r"'square' and 'clash' both define token\(s\) \['\[v\]'\]"):
        add_concept(pipe, load_concept(files["clash"]))


def test_prompt_with_an_undefined_token_is_refused(files):
    pipe = pipeline(files)
    add_concept(pipe, load_concept(files["square"]))
    with pytest.raises(ValueError, match=r"\[v9\] that no applied concept defines; defined tokens: \[u\], "):
        sample(pipe, "a [v9] square")


@pytest.mark.parametrize(("frames", "size", "message"), [
    (6, (32, 32), r"1 \+ 4k frames, e.g. 5 or 9"),
    (5, (24, 32), r"multiples of 16 .* e.g. 16x32"),
    (5, (8, 32), r"multiples of 16"),
])
def test_bad_video_shape_is_refused_naming_valid_values(frames, size, message):
    with pytest.raises(ValueError, match=message):
        SMALL.latent_shape(frames, size)


def test_guidance_defaults_to_the_base_models_own():
    gen = GenerateConfig(frames=5, size=(32, 32)).resolved(SMALL)
    assert (gen.guidance, gen.steps, gen.shift, gen.self_cond) == (SMALL.guidance, SMALL.sample_steps,
                                                                   SMALL.sample_shift, True)


def test_concept_argument_with_scales():
    path = parse_concept("a.safetensors", 0, 0)[0]
    assert parse_concept("a.safetensors:0.5:0", 1.0, 1.0) == (path, 0.5, 0.0)
    assert parse_concept("a.safetensors", 0.3, 0.7)[1:] == (0.3, 0.7)
    with pytest.raises(ValueError, match="must be finite numbers"):
        parse_concept("a.safetensors:x:1", 1.0, 1.0)


def test_a_concept_confined_to_the_whole_frame_changes_nothing_and_to_half_of_it_does(files):
    pipe = pipeline(files)
    adapter = add_concept(pipe, load_concept(files["square"]))
    prompt = "a [v] square [u] moving."
    free = sample(pipe, prompt)
    assert torch.equal(sample(pipe, prompt, regions={adapter: (0, 0, 1, 1)}), free)
    left = sample(pipe, prompt, regions={adapter: (0, 0, 0.5, 1)})
    assert (left - free).abs().max() > 1e-3
    with pytest.raises(ValueError, match="holds no token centre"):
        sample(pipe, prompt, regions={adapter: (0, 0, 0.05, 1)})
    with pytest.raises(ValueError, match="does not hold"):
        sample(pipe, prompt, regions={"nosuch": (0, 0, 1, 1)})


def test_a_concepts_words_are_the_span_from_its_first_token_to_its_last(files):
    pipe = pipeline(files)
    square = add_concept(pipe, load_concept(files["square"]))
    circle = add_concept(pipe, load_concept(files["circle"]))
    prompt = "a [v] square [u] moving beside a [v2] circle."
    ids = pipe.tokenizer.encode([prompt], pipe.config.t5.max_length)[0][0].tolist()
    at = {t: ids.index(pipe.tokenizer.added_tokens[t]) for t in ("[v]", "[u]", "[v2]")}
    words = word_positions(pipe, prompt, [square, circle])
    assert words[square].nonzero().flatten().tolist() == list(range(at["[v]"], at["[u]"] + 1))
    assert words[circle].nonzero().flatten().tolist() == [at["[v2]"]]  # its only token in the prompt
    assert word_positions(pipe, "a red square.", [square]) == {}


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(files, *args) -> int:
    return cli_main(["generate", "--base", str(files["base"]), *SHAPE_ARGS, *map(str, args)])


def test_cli_writes_mp4_gif_and_contact_sheet(files, tmp_path):
    out = tmp_path / "clip.mp4"
    rc = run_cli(files, "--concept", files["square"], "--concept", f"{files['circle']}:1:0.5",
                 "--prompt", "a [v] square [u] moving beside a [v2] circle.", "--contact-sheet", "--out", out)
    assert rc == 0
    for suffix in (".mp4", ".gif"):
        frames = iio.imread(out.with_suffix(suffix), index=None)
        assert frames.shape[:3] == (5, 32, 32), suffix
    sheet = iio.imread(out.with_suffix(".png"))
    pad = media.SHEET_PAD
    assert sheet.shape[:2] == (2 * pad + media.LABEL_HEIGHT + 32, pad + 5 * (32 + pad))


def test_cli_region_confines_its_concept(files, tmp_path):
    whole, left = tmp_path / "whole.mp4", tmp_path / "left.mp4"
    prompt = ("--prompt", "a [v] square [u] moving beside a [v2] circle.")
    concepts = ("--concept", files["square"], "--concept", files["circle"])
    assert run_cli(files, *concepts, *prompt, "--region", "0,0,1,1", "--out", whole) == 0
    halves = ("--region", "0,0,0.5,1", "--region", "0.5,0,1,1")
    assert run_cli(files, *concepts, *prompt, *halves, "--out", left) == 0
    a, b = iio.imread(whole, index=None).astype(int), iio.imread(left, index=None).astype(int)
    assert a.shape == b.shape and abs(a - b).max() > 0


def test_cli_with_reference_puts_it_first_and_writes_metrics(files, tmp_path):
    ref = tmp_path / "ref.mp4"
    write_video(ref, torch.rand(3, 9, 32, 32) * 2 - 1, fps=8)
    out = tmp_path / "clip.mp4"
    rc = run_cli(files, "--prompt", "a red square.", "--reference", ref, "--contact-sheet", "--out", out)
    assert rc == 0
    scores = json.loads(out.with_suffix(".metrics.json").read_text())
    assert isinstance(scores["mse"], float) and scores["clip_t"] == "not available"
    assert scores["motion_fidelity"] == "not available"  # not the tiny base: no toy-world instruments
    sheet = iio.imread(out.with_suffix(".png"))
    assert sheet.shape[0] == media.SHEET_PAD + 2 * (media.LABEL_HEIGHT + 32 + media.SHEET_PAD)


def test_cli_on_the_tiny_base_adds_the_toy_world_instruments(tmp_path):
    base = Path(__file__).resolve().parents[1] / "assets" / "tiny"
    ref = tmp_path / "ref.mp4"
    write_video(ref, torch.rand(3, 17, 64, 64) * 2 - 1, fps=8)
    out = tmp_path / "toy.mp4"
    prompt = "a red square moves left on a blue background"
    rc = cli_main(["generate", "--base", str(base), "--prompt", prompt, "--steps", "2",
                   "--reference", str(ref), "--out", str(out), "--no-progress"])
    assert rc == 0
    scores = json.loads(out.with_suffix(".metrics.json").read_text())
    assert all(isinstance(scores[k], float) for k in ("mse", "id", "id_crop", "motion_fidelity"))


def test_cli_names_a_prompt_word_the_tiny_base_cannot_read(tmp_path, capsys):
    out = tmp_path / "w.mp4"
    rc = cli_main(["generate", "--base", "tiny", "--prompt", "a red sprite moves left on a blue background",
                   "--steps", "1", "--frames", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'sprite'" in warnings[0] and "'red'" not in warnings[0]


def test_cli_with_clip_adds_clip_t_of_the_video_and_prompt(files, clip_folder, tmp_path):
    from sample.clip import ClipTextScorer
    from weights.clip import load_clip

    out = tmp_path / "clip.mp4"
    prompt = "a red square moving left."
    assert run_cli(files, "--prompt", prompt, "--clip", clip_folder[0], "--out", out) == 0
    scores = json.loads(out.with_suffix(".metrics.json").read_text())
    frames = iio.imread(out, index=None)  # the written mp4 is lossy: compare with the raw frames' score
    want = ClipTextScorer(*load_clip(clip_folder[0]))(frames, prompt)
    assert scores["clip_t"] == pytest.approx(want, abs=0.05)
    assert scores["arcface"] == "not available" and "mse" not in scores  # no --reference


def test_cli_with_arcface_scores_identity_against_the_reference(files, tmp_path):
    from model.arcface import IResNet

    torch.manual_seed(0)
    torch.save(IResNet([1, 1, 1, 1], num_features=64).state_dict(), tmp_path / "backbone.pth")
    ref = tmp_path / "ref.mp4"
    write_video(ref, torch.rand(3, 9, 32, 32) * 2 - 1, fps=8)
    out = tmp_path / "face.mp4"
    rc = run_cli(files, "--prompt", "a red square.", "--reference", ref, "--arcface",
                 tmp_path / "backbone.pth", "--face-box", "0.25,0.25,0.75,0.75", "--out", out)
    assert rc == 0
    scores = json.loads(out.with_suffix(".metrics.json").read_text())
    assert isinstance(scores["arcface"], float) and -1 <= scores["arcface"] <= 1
    assert scores["clip_t"] == "not available"


@pytest.mark.parametrize(("flags", "message"), [
    (["--arcface", "face.pth"], "pass --reference too"),
    (["--clip", "nowhere"], "expected a HF CLIP folder"),
    (["--face-box", "0,0,1,1"], "only applies to --arcface"),
    (["--reference", "REF", "--arcface", "FACE", "--face-box", "0.8,0,0.2,1"], "0 <= x0 < x1 <= 1"),
])
def test_cli_scorer_flags_fail_before_loading_anything(files, tmp_path, capsys, flags, message):
    out = tmp_path / "x.mp4"
    for name in ("REF", "FACE"):  # stand-ins for files that exist
        (tmp_path / name).touch()
    flags = [str(tmp_path / f) if f in ("REF", "FACE") else f for f in flags]
    assert run_cli(files, "--prompt", "a red square.", *flags, "--out", out) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "no such concept file"),
    ("other_base", "was trained on base model gen-test .* but this model is gen-test"),
    ("token", r"\[v7\] that no applied concept defines"),
    ("size", "--size 30x32: height and width must be positive multiples of 16"),
    ("size_text", "is not HxW in pixels"),
    ("frames", "--frames 4: this base takes 1 \\+ 4k frames"),
])
def test_cli_bad_input_exits_2_with_one_clear_line(files, tmp_path, capsys, case, message):
    args = {"concept": files["square"], "prompt": "a [v] square.", "size": "32x32", "frames": "5"}
    if case == "missing":
        args["concept"] = tmp_path / "nope.safetensors"
    elif case == "other_base":
        args["concept"] = files["other_base"]
    elif case == "token":
        args["prompt"] = "a [v7] square."
    elif case == "size":
        args["size"] = "30x32"
    elif case == "size_text":
        args["size"] = "big"
    elif case == "frames":
        args["frames"] = "4"
    out = tmp_path / "x.mp4"
    rc = cli_main(["generate", "--base", str(files["base"]), "--steps", "1", "--no-progress",
                   "--out", str(out), "--concept", str(args["concept"]), "--prompt", args["prompt"],
                   "--size", args["size"], "--frames", args["frames"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("setseq generate: error:"), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()
