"""Set-and-Sequence personalization on a tiny random model (train/personalize.py, data, prior, checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora.concept import apply_concept, load_concept
from lora.inject import inject_lora, set_stage
from lora.layers import LoRALinear
from model.base import Base
from model.config import PRESETS
from model.dit import DiT
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer
from model.vae import VAE
from sample.sampler import sample_latents
from setseq.cli import main as cli_main
from tests.makers import square_video
from train import personalize as P
from train.checkpoint import capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from train.config import ConceptSpec, PersonalizeConfig
from train.data import LatentSet, build_prompt_table, clip_items, mask_tokens
from train.personalize import Diverged
from train.stage_data import StageData, batch_context, draw_batch, stage_prompts
from train.step import loss_step
from train.video import read_frames, read_video, write_video

LATENT = PRESETS["tiny"].dit.in_channels  # latent channels of the tiny preset

_TINY = PRESETS["tiny"]
TINY = dataclasses.replace(
    _TINY,
    dit=dataclasses.replace(_TINY.dit, dim=64, heads=2, layers=2, ffn_dim=128, rope_split=(12, 10, 10)),
    vae=dataclasses.replace(_TINY.vae, base_channels=8),
    t5=dataclasses.replace(_TINY.t5, layers=1),
)
PROMPT = "a [v] square on a grey background."
MOTION = "It is [u] moving right."


def make_base(sp_model_path: str, seed: int = 0) -> Base:
    """A tiny random base. The DiT's zero-initialized output head is randomized like a trained one:
    with a zero head no gradient reaches the LoRA at all."""
    torch.manual_seed(seed)
    dit = DiT(TINY.dit)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)
    tokenizer = Tokenizer(sp_model_path, first_added_id=TINY.t5.vocab_size)  # concept tokens get fresh rows
    return Base(TINY, dit, VAE(TINY.vae), T5Encoder(TINY.t5), tokenizer, "tiny-test")



@pytest.fixture
def video(tmp_path) -> str:
    path = tmp_path / "square.mp4"
    write_video(path, square_video(), fps=8)
    return str(path)


def config(tmp_path: Path, video: str, **kw) -> PersonalizeConfig:
    values = dict(concepts=[ConceptSpec(video, PROMPT, MOTION)], out=str(tmp_path / "c.safetensors"),
                  steps1=4, steps2=4, batch_size=3, rank=4, prior_count=2, prior_per_batch=1, prior_steps=2,
                  checkpoint_every=2, log_every=2, progress=False)
    values.update(kw)
    return PersonalizeConfig(**values)


def read_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------------------ regularizers


def test_token_masking_changes_the_conditioning(sp_model_path):
    base = make_base(sp_model_path)
    ids, mask = base.tokenizer.encode([PROMPT.replace("[v] ", "")] * 2, 16)
    context = base.t5(ids, mask)
    g = torch.Generator().manual_seed(0)
    masked, kept = mask_tokens(context, mask, 0.5, g)
    assert bool((kept <= mask).all()) and int(kept.sum()) < int(mask.sum())
    assert bool((masked[~kept] == 0).all())
    x, t = torch.randn(2, LATENT, 1, 4, 4), torch.full((2,), 0.5)
    with torch.no_grad():
        v_full = base.dit(x, t, context, context_mask=mask)
        v_masked = base.dit(x, t, masked, context_mask=kept)
    assert (v_full - v_masked).abs().max() > 1e-4


def test_token_masking_never_hides_every_token():
    mask = torch.tensor([[True, True, False, False]] * 64)
    _, kept = mask_tokens(torch.ones(64, 4, 3), mask, 0.99, torch.Generator().manual_seed(0))
    assert bool(kept.any(dim=1).all())


def _stage_data(base: Base, prompts: list[str], prior: bool) -> StageData:
    table = build_prompt_table(["", *prompts], base.tokenizer, base.t5, 16, [])
    g = torch.Generator().manual_seed(1)
    zeros = torch.zeros(4, dtype=torch.long)
    items = LatentSet(torch.randn(4, LATENT, 1, 4, 4, generator=g), torch.ones(4, dtype=torch.long), zeros)
    prior_set = None
    if prior:
        prior_set = LatentSet(torch.randn(2, LATENT, 1, 4, 4, generator=g), torch.full((2,), 2), zeros[:2])
    return StageData(items, None, prior_set, table, 0)


def _loss_and_grad(cfg: PersonalizeConfig, base: Base, data: StageData):
    torch.manual_seed(0)
    out = loss_step(cfg, base.dit, base.t5, data, torch.Generator().manual_seed(0), shift=1.0)
    params = [p for p in base.dit.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out, torch.cat([g.flatten() for g in grads])


def test_prior_preservation_contributes_to_the_loss(sp_model_path, tmp_path):
    base = make_base(sp_model_path)
    inject_lora(base.dit, rank=4, name="concept")
    set_stage(base.dit, 1)
    data = _stage_data(base, ["a red square.", "a blue circle. It moves left."], prior=True)
    kw = dict(batch_size=4, prior_per_batch=2, caption_dropout=0.0, token_mask_prob=0.0)
    out0, grad0 = _loss_and_grad(config(tmp_path, "v.mp4", prior_weight=0.0, **kw), base, data)
    out1, grad1 = _loss_and_grad(config(tmp_path, "v.mp4", prior_weight=1.0, **kw), base, data)
    assert out1.batch.is_prior.sum() == 2
    prior_term = out1.per_sample[out1.batch.is_prior].mean()
    assert prior_term > 0
    torch.testing.assert_close(out1.loss - out0.loss, prior_term)  # loss = concept + w * prior
    assert (grad1 - grad0).abs().max() > 1e-6


def test_caption_dropout_uses_the_empty_prompt(sp_model_path, tmp_path):
    base = make_base(sp_model_path)
    data = _stage_data(base, ["a red square."], prior=False)
    cfg = config(tmp_path, "v.mp4", batch_size=64, caption_dropout=0.1, prior_count=0)
    batch = draw_batch(cfg, data, torch.Generator().manual_seed(0))
    dropped = (batch.prompt == data.empty).float().mean()
    assert 0.0 < dropped < 0.3


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_restores_optimizer_and_every_rng(tmp_path):
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.99))
    w.grad = torch.ones(3)
    opt.step()
    g = torch.Generator().manual_seed(3)
    path = save_checkpoint(tmp_path / "stage1-step000001.safetensors", stage=1, step=1, params={"w": w},
                           optimizer=opt, rng=capture_rng(g), config={"a": 1})
    expected = (torch.rand(2), torch.rand(2, generator=g))
    torch.rand(5), torch.rand(5, generator=g)  # move every generator on
    ckpt = load_checkpoint(path)
    restore_rng(ckpt.rng, g)
    assert torch.equal(torch.rand(2), expected[0]) and torch.equal(torch.rand(2, generator=g), expected[1])
    assert ckpt.stage == 1 and ckpt.step == 1 and ckpt.config == {"a": 1} and torch.equal(ckpt.params["w"], w)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone())], lr=0.1, betas=(0.9, 0.99))
    opt2.load_state_dict(ckpt.optimizer)
    state, state2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(state2["exp_avg_sq"], state["exp_avg_sq"])
    assert torch.equal(state2["step"], state["step"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, calls: int) -> None:
    real, count = loss_step, [0]

    def step(*args, **kw):
        count[0] += 1
        if count[0] > calls:
            raise _Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(P, "loss_step", step)  # the name the loop calls


def test_resumed_run_equals_uninterrupted_bitwise(sp_model_path, tmp_path, video, monkeypatch):
    whole = config(tmp_path / "a", video, steps1=5, steps2=5)
    P.main(whole, make_base(sp_model_path), sample_latents)

    cut = config(tmp_path / "b", video, steps1=5, steps2=5)
    _interrupt_after(monkeypatch, 3)  # stage 1 step 4 never finishes; last checkpoint: stage 1 step 2
    with pytest.raises(_Interrupt):
        P.main(cut, make_base(sp_model_path), sample_latents)
    monkeypatch.undo()
    _interrupt_after(monkeypatch, 6)  # resumed at stage 1 step 2: dies at stage 2 step 4 (checkpoint: step 2)
    with pytest.raises(_Interrupt):
        P.main(dataclasses.replace(cut, resume=True), make_base(sp_model_path), sample_latents)
    assert [p.name for p in list_checkpoints(cut.work / "checkpoints")][-1] == "stage2-step000002.safetensors"
    monkeypatch.undo()
    P.main(dataclasses.replace(cut, resume=True), make_base(sp_model_path), sample_latents)

    a, b = read_tensors(whole.out), read_tensors(cut.out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert any(k.endswith("lora_B2") and a[k].abs().sum() > 0 for k in a)  # both stages trained


# ---------------------------------------------------------------------------------------- training


def _video_loss(base: Base, video: str, text: str) -> float:
    """Flow-matching loss of the clip at fixed times and noise, adapter in eval mode (no dropout)."""
    with torch.no_grad():
        x0 = base.vae.encode(clip_items(read_video(video, multiple=16), 13))  # (1, C, T', h, w)
        x0 = x0.expand(6, -1, -1, -1, -1)
        t = torch.linspace(0.1, 0.9, 6)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        ids, mask = base.tokenizer.encode([text] * 6, TINY.t5.max_length)
        base.dit.eval()
        v = base.dit((1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps, t, base.t5(ids, mask),
                     context_mask=mask)
        return float((v - (eps - x0)).pow(2).mean())


def test_personalization_lowers_the_loss_on_its_video(sp_model_path, tmp_path, video):
    base = make_base(sp_model_path)
    base.tokenizer.add_tokens(["[v]", "[u]"])
    base.t5.resize_token_embeddings(base.tokenizer.vocab_size)  # zero rows, as training starts
    text = f"{PROMPT} {MOTION}"
    before = _video_loss(base, video, text)
    # A test-sized run: a higher lr than the paper's 1e-4 so that 90 steps show it learning.
    cfg = config(tmp_path, video, steps1=30, steps2=60, lr=1e-2, rank=8, batch_size=4, prior_count=0,
                 checkpoint_every=100)
    P.main(cfg, base, sample_latents)
    after = _video_loss(base, video, text)
    print(f"tiny personalization: loss on its video {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_stage_2_changes_no_stage_1_tensor(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, stages=(1,), prior_count=0)
    P.main(cfg, make_base(sp_model_path))
    stage1 = read_tensors(cfg.out)
    P.main(dataclasses.replace(cfg, stages=(2,), force=True), make_base(sp_model_path))
    stage2 = read_tensors(cfg.out)
    assert stage1.keys() == stage2.keys()
    for k in stage1:
        if k.endswith("lora_B2") or k == "token.[u]":
            assert not torch.equal(stage1[k], stage2[k]), k  # trained in stage 2
        else:
            assert torch.equal(stage1[k], stage2[k]), k  # A1, B1, [v]: untouched


def _shifts_trained(monkeypatch, cfg: PersonalizeConfig, sp_model_path) -> list[tuple[int, float]]:
    """(latent frames of the concept items, shift) of every training step of a run on a fresh base."""
    seen = []

    def step(cfg, dit, t5, data, g, shift, share=None):
        seen.append((data.items.latents.shape[2], shift))
        return loss_step(cfg, dit, t5, data, g, shift, share)

    monkeypatch.setattr(P, "loss_step", step)  # the name the loop calls
    P.main(cfg, make_base(sp_model_path))
    return seen


def test_stage_1_trains_its_frames_at_the_frame_time_shift(sp_model_path, tmp_path, video, monkeypatch):
    cfg = config(tmp_path / "a", video, steps1=2, steps2=2, prior_count=0, time_shift=4.0,
                 frame_time_shift=2.0)
    frames, clip = 1, 1 + (13 - 1) // TINY.vae.time_compression
    assert _shifts_trained(monkeypatch, cfg, sp_model_path) == [(frames, 2.0)] * 2 + [(clip, 4.0)] * 2
    unset = config(tmp_path / "b", video, steps1=2, steps2=2, prior_count=0)  # both at the base's own
    assert [s for _, s in _shifts_trained(monkeypatch, unset, sp_model_path)] == [TINY.sample_shift] * 4
    # one stage on clips (DB-LoRA): no frames, so the clips' shift
    single = config(tmp_path / "c", video, stages=(1,), single_stage=True, steps1=2, prior_count=0,
                    time_shift=4.0, frame_time_shift=2.0)
    assert _shifts_trained(monkeypatch, single, sp_model_path) == [(clip, 4.0)] * 2


@pytest.mark.parametrize("field", ["time_shift", "frame_time_shift"])
def test_a_shift_that_is_not_positive_is_refused(tmp_path, video, field):
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        config(tmp_path, video, **{field: 0.0})


def test_several_concepts_share_one_adapter(sp_model_path, tmp_path):
    paths = []
    for i, shift in enumerate((0, 6)):
        path = tmp_path / f"v{i}.mp4"
        write_video(path, square_video().roll(shift, dims=2), fps=8)
        paths.append(str(path))
    concepts = [ConceptSpec(paths[0], "a [v1] square.", "It is [u1] moving.", "[v1]", "[u1]"),
                ConceptSpec(paths[1], "a [v2] square.", "It is [u2] moving.", "[v2]", "[u2]")]
    cfg = config(tmp_path, paths[0], concepts=concepts, stitch_prob=0.5, prior_count=0, steps1=3, steps2=3)
    P.main(cfg, make_base(sp_model_path))
    concept = load_concept(cfg.out)
    assert set(concept.tokens) == {"[v1]", "[u1]", "[v2]", "[u2]"}
    assert concept.prompts["static.1"] == "a [v2] square."
    assert len(list((cfg.work / "cache").glob("stitched-stage*"))) == 4  # both orders of the pair, per stage


def test_stitched_pairs_come_in_both_orders_in_the_layouts_grammar(sp_model_path, tmp_path, video):
    concepts = [ConceptSpec(video, "a [v1] square on a gray background", "moves [u1]", "[v1]", "[u1]",
                            full_prompt="a [v1] square moves [u1] on a gray background"),
                ConceptSpec(video, "a [v2] circle on a gray background", "moves [u2]", "[v2]", "[u2]",
                            full_prompt="a [v2] circle moves [u2] on a gray background")]
    cfg = config(tmp_path, video, concepts=concepts, stitch_prob=0.5, pair_layout="halves")
    assert cfg.pair_plan() == [(0, 1), (1, 0)]
    assert stage_prompts(cfg, 2)[1] == [
        "a [v1] square moves [u1] and a [v2] circle moves [u2] on a gray background",
        "a [v2] circle moves [u2] and a [v1] square moves [u1] on a gray background"]
    assert stage_prompts(cfg, 1)[1][1] == "a [v2] circle and a [v1] square on a gray background"
    alone = dataclasses.replace(cfg, stitch_prob=0.0)
    assert alone.pair_plan() == [] and stage_prompts(alone, 2)[1] == []
    with_ordinary = dataclasses.replace(cfg, concepts=concepts[:1], companion_prompts=(
        "a red circle on a gray background | a red circle moves up on a gray background",))
    assert with_ordinary.pair_plan() == [(0, 1), (1, 0)]  # the concept beside the base's object, both orders
    assert stage_prompts(with_ordinary, 2)[1][0] == (
        "a [v1] square moves [u1] and a red circle moves up on a gray background")


def test_several_videos_of_one_concept_share_its_tokens_and_never_stitch_beside_each_other(
        sp_model_path, tmp_path, video):
    def spec(v, u, bg):
        return ConceptSpec(video, f"a {v} square on a {bg} background", f"moves {u}", v, u,
                           full_prompt=f"a {v} square moves {u} on a {bg} background")

    two_videos = [spec("[v1]", "[u1]", "gray"), spec("[v1]", "[u1]", "blue")]
    cfg = config(tmp_path, video, concepts=two_videos, stitch_prob=0.5, pair_layout="halves", prior_count=0,
                 steps1=2, steps2=2)
    assert cfg.tokens() == ["[v1]", "[u1]"] and cfg.concept_count() == 1
    assert not cfg.stitches() and cfg.pair_plan() == []  # one concept: nothing to compose
    other = dataclasses.replace(cfg, concepts=[*two_videos, spec("[v2]", "[u2]", "gray")])
    assert other.tokens() == ["[v1]", "[v2]", "[u1]", "[u2]"]
    assert other.pair_plan() == [(0, 2), (1, 2), (2, 0), (2, 1)]  # only across the two concepts
    with pytest.raises(ValueError, match="used by more than one concept"):
        dataclasses.replace(cfg, concepts=[spec("[v1]", "[u1]", "gray"), spec("[v1]", "[u2]", "gray")])
    P.main(cfg, make_base(sp_model_path))
    concept = load_concept(cfg.out)
    assert set(concept.tokens) == {"[v1]", "[u1]"}
    assert concept.prompts["static.1"] == "a [v1] square on a blue background"


def test_a_concept_trains_beside_the_bases_own_generation_of_an_ordinary_object(sp_model_path, tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, square_video(frames=9, size=32), fps=8)
    concept = ConceptSpec(str(path), "a [v] square on a gray background", "moves [u]",
                          full_prompt="a [v] square moves [u] on a gray background")
    companion = "a red circle on a gray background | a red circle moves up on a gray background"
    cfg = config(tmp_path, str(path), concepts=[concept], stitch_prob=1.0, pair_layout="halves",
                 companion_prompts=(companion,), prior_count=0, steps1=2, steps2=2)
    P.main(cfg, make_base(sp_model_path), sample_fn=sample_latents)
    cache = cfg.work / "cache"
    assert len(list(cache.glob("companions-*"))) == 1  # generated once by the base
    assert len(list(cache.glob("stitched-stage*"))) == 4  # concept | object and object | concept, per stage
    assert load_concept(cfg.out).train_config["companion_prompts"] == [companion]


def test_a_stitched_prompt_that_truncates_a_token_is_refused_before_any_work(sp_model_path, tmp_path, video):
    """Each concept's prompt fits the text encoder, their stitched pair does not: a clear error, not a
    silently truncated [v2]."""
    base = make_base(sp_model_path)
    limit = TINY.t5.max_length
    words = 1
    while len(base.tokenizer.tokenize("a [v1] " + "big " * (words + 1) + "square.")) < 0.7 * limit:
        words += 1
    filler = "big " * words
    concepts = [ConceptSpec(video, f"a [v1] {filler}square.", "It is [u1] moving.", "[v1]", "[u1]"),
                ConceptSpec(video, f"a [v2] {filler}square.", "It is [u2] moving.", "[v2]", "[u2]")]
    cfg = config(tmp_path, video, concepts=concepts, stitch_prob=0.5, prior_count=0, steps1=2, steps2=2)
    with pytest.raises(ValueError, match="stitched prompt of concepts 1 and 2"):
        P.main(cfg, base)
    assert not cfg.work.exists() or not any(cfg.work.glob("cache/*")), "nothing should be computed"
    P.main(dataclasses.replace(cfg, stitch_prob=0.0), make_base(sp_model_path))  # without pairs it trains


def test_concept_file_names_its_base_and_refuses_another(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, prior_count=0, steps1=2, steps2=2)
    P.main(cfg, make_base(sp_model_path))
    concept = load_concept(cfg.out)
    assert concept.base.name == "tiny-test" and concept.rank == 4
    assert concept.train_config["steps1"] == 2 and concept.prompts["dynamic"] == MOTION
    other = DiT(dataclasses.replace(TINY.dit, layers=3))
    with pytest.raises(ValueError, match="trained on base model"):
        apply_concept(other, concept)


def test_previews_are_written_as_gifs(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, prior_count=0, steps1=2, steps2=2, preview_every=2, preview_steps=2)
    P.main(cfg, make_base(sp_model_path), sample_latents)
    previews = sorted(p.name for p in (cfg.work / "previews").iterdir())
    assert previews == ["stage1-step000002.gif", "stage2-step000002.gif"]
    frames, _ = read_frames(cfg.work / "previews" / "stage2-step000002.gif")
    assert frames.shape[1:] == (32, 32, 3)


# --------------------------------------------------------------------------------------- bad input


def test_prompt_without_v_is_refused_before_any_work(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, concepts=[ConceptSpec(video, "a square.", MOTION)])
    with pytest.raises(ValueError, match=r"does not contain \[v\]"):
        P.main(cfg, make_base(sp_model_path), sample_latents)
    assert not cfg.work.exists() and not Path(cfg.out).exists()


def test_motion_prompt_without_u_is_refused_in_stage_2(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, concepts=[ConceptSpec(video, PROMPT, "It moves right.")])
    with pytest.raises(ValueError, match=r"does not contain \[u\]"):
        P.main(cfg, make_base(sp_model_path), sample_latents)


def test_existing_out_is_not_overwritten(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video)
    Path(cfg.out).write_bytes(b"precious")
    with pytest.raises(ValueError, match="--force"):
        P.main(cfg, make_base(sp_model_path), sample_latents)
    assert Path(cfg.out).read_bytes() == b"precious"


def test_video_shorter_than_one_clip_is_refused(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, frames=17)
    with pytest.raises(ValueError, match="shorter than one clip of 17"):
        P.main(cfg, make_base(sp_model_path), sample_latents)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sp_model_path, tmp_path, video, monkeypatch):
    real, count = loss_step, [0]

    def step(*args, **kw):
        out = real(*args, **kw)
        count[0] += 1
        return dataclasses.replace(out, loss=out.loss * float("nan")) if count[0] == 3 else out

    monkeypatch.setattr(P, "loss_step", step)  # the name the loop calls
    cfg = config(tmp_path, video, prior_count=0)
    with pytest.raises(Diverged, match="stage 1 step 3.*stage1-step000002"):
        P.main(cfg, make_base(sp_model_path))
    assert [p.name for p in list_checkpoints(cfg.work / "checkpoints")] == ["stage1-step000002.safetensors"]
    assert load_checkpoint(cfg.work / "checkpoints" / "stage1-step000002.safetensors").step == 2
    assert not Path(cfg.out).exists()


def test_a_blown_up_adapter_stops_before_its_checkpoint_and_a_resume_with_a_lower_lr_continues(
        sp_model_path, tmp_path, video, capsys):
    """--stage 1, then --stage 2 (no --force: it replaces stage 1's file) at lr 1e3: the adapter blows up
    at its first step with finite loss; the message names the stage-1 checkpoint and --resume; a resume
    there at lr 5e-4 finishes with finite weights and records the change."""
    out = tmp_path / "c.safetensors"
    argv = ["personalize", video, "--prompt", PROMPT, "--motion-prompt", MOTION, "--base", "tiny",
            "--tokenizer", sp_model_path, "--random-weights", "--out", str(out), "--steps1", "4", "--steps2",
            "4", "--batch-size", "2", "--rank", "2", "--prior-count", "0", "--checkpoint-every", "2",
            "--device", "cpu"]
    assert cli_main([*argv, "--stage", "1"]) == 0
    stage1 = out.read_bytes()
    capsys.readouterr()
    assert cli_main([*argv, "--stage", "2", "--lr", "1e3"]) == 3
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if ": error: " in x)
    assert "the adapter blew up" in line and "at stage 2 step 1" in line, line
    assert "stage1-step000004.safetensors" in line and "--resume and a lower --lr" in line, line
    assert "lr 0.001 -> 1000.0" in err  # the change from the stage-1 run (the tiny recipe's lr) is said
    assert out.read_bytes() == stage1 and not (tmp_path / "c.work" / "checkpoints" / "stage2-step000002"
                                                ".safetensors").exists()
    assert cli_main([*argv, "--stage", "2", "--resume", "--lr", "5e-4"]) == 0
    concept = load_concept(out)  # refuses NaN or inf tensors
    assert any(k.endswith("lora_B2") and 0 < v.abs().max() < 1 for k, v in concept.lora.items())
    assert concept.train_config["lr"] == 5e-4
    assert concept.train_config["resumed"] == [{"stage": 1, "step": 4, "changed": {"lr": [1e-3, 5e-4]}}]


def test_a_resume_with_unchanged_settings_records_nothing(sp_model_path, tmp_path, video):
    cfg = config(tmp_path, video, prior_count=0)
    P.main(dataclasses.replace(cfg, stages=(1,)), make_base(sp_model_path))
    P.main(dataclasses.replace(cfg, stages=(2,)), make_base(sp_model_path))  # replaces stage 1's file
    assert load_concept(cfg.out).train_config["resumed"] == []


def test_a_clip_larger_than_the_base_takes_is_refused_before_any_encoding(sp_model_path, tmp_path,
                                                                          monkeypatch):
    big = tmp_path / "big.mp4"
    write_video(big, square_video(size=160), fps=8)  # the tiny DiT's position table covers 128x128
    base = make_base(sp_model_path)
    monkeypatch.setattr(base.vae, "encode", lambda *a, **k: pytest.fail("encoded before the size check"))
    with pytest.raises(ValueError, match=r"160x160 pixels, larger than base tiny takes: at most 128x128 "
                                         r"pixels and 29 frames; pass --size 128x128"):
        P.main(config(tmp_path, str(big)), base, sample_latents)
    assert not (tmp_path / "c.work").exists()


def test_the_memory_estimate_counts_activations_and_refuses_with_the_numbers(sp_model_path, tmp_path, video,
                                                                             monkeypatch):
    import train.preflight as F

    cfg = config(tmp_path, video, batch_size=3)
    d, f, n = TINY.dit.dim, TINY.dit.ffn_dim, TINY.dit.layers
    tokens = 4 * 2 * 2  # 13 frames of 32x32: the tiny VAE's (4, 4, 4) latent grid in patches of 1x2x2
    assert TINY.token_grid(13, (32, 32)) == (4, 2, 2)
    per_block = 3 * tokens * (16 * d + 2 * f) * 4
    assert F.training_bytes(cfg, TINY, 13, (32, 32), 4) == n * per_block
    ckpt = dataclasses.replace(cfg, grad_checkpointing=True)
    assert F.training_bytes(ckpt, TINY, 13, (32, 32), 4) == n * 3 * tokens * d * 4 + per_block
    monkeypatch.setattr(F, "free_bytes", lambda device: per_block)  # less than the n blocks need
    with pytest.raises(ValueError, match=r"needs about 0.0 GiB .*--batch-size 3, clips of 13 frames at "
                                         r"32x32.*cpu has 0.0 GiB free; use --grad-checkpointing"):
        P.main(cfg, make_base(sp_model_path), sample_latents)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_toml_form_writes_a_concept(sp_model_path, tmp_path, video, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'''base = "tiny"
tokenizer = "{sp_model_path}"
random_weights = true
out = "{tmp_path / 'cli.safetensors'}"
steps1 = 2
steps2 = 2
batch_size = 2
rank = 2
prior_count = 0
progress = false

[[concepts]]
video = "{video}"
prompt = "{PROMPT}"
motion_prompt = "{MOTION}"
''')
    assert cli_main(["personalize", "--config", str(toml), "--device", "cpu"]) == 0
    assert load_concept(tmp_path / "cli.safetensors").rank == 2
    assert "loss.tsv" in capsys.readouterr().out
    log = (tmp_path / "cli.work" / "loss.tsv").read_text().splitlines()
    assert log[0].startswith("stage\tstep\tloss") and len(log) == 3  # header + one row per stage


def test_cli_toml_with_two_concepts_trains_side_by_side_on_a_small_wan_config(sp_model_path, tmp_path,
                                                                               monkeypatch):
    """The real-scale recipe: two concepts in one TOML, stitched side by side in natural language (Wan's
    pair layout, the default), on a small random Wan-architecture base."""
    wan = PRESETS["wan2.1-1.3b"]
    cfg = dataclasses.replace(
        wan, dit=dataclasses.replace(wan.dit, dim=24, heads=2, layers=2, ffn_dim=40, text_dim=32),
        vae=dataclasses.replace(wan.vae, base_channels=8),
        t5=dataclasses.replace(wan.t5, vocab_size=TINY.t5.vocab_size, dim=32, head_dim=8, heads=4, ffn_dim=48,
                               layers=1, max_length=128))

    def small_wan(base, **kwargs):
        torch.manual_seed(0)
        dit = DiT(cfg.dit)
        torch.nn.init.normal_(dit.head.head.weight, std=0.05)
        tokenizer = Tokenizer(sp_model_path, first_added_id=cfg.t5.vocab_size)
        return Base(cfg, dit, VAE(cfg.vae), T5Encoder(cfg.t5), tokenizer, "wan-small-test")

    monkeypatch.setattr("setseq.cmd_personalize.load_base", small_wan)
    videos = []
    for i, shift in enumerate((0, 6)):
        path = tmp_path / f"v{i}.mp4"
        write_video(path, square_video(frames=9, size=32).roll(shift, dims=2), fps=8)
        videos.append(path)
    toml = tmp_path / "two.toml"
    toml.write_text(f'''base = "wan2.1-1.3b"
random_weights = true
out = "{tmp_path / 'two.safetensors'}"
steps1 = 2
steps2 = 2
batch_size = 2
rank = 2
prior_count = 0
stitch_prob = 1.0
progress = false

[[concepts]]
video = "{videos[0]}"
prompt = "A [v1] dancer on a bridge."
motion_prompt = "She performs [u1] motion."
token = "[v1]"
motion_token = "[u1]"

[[concepts]]
video = "{videos[1]}"
prompt = "A [v2] campfire on a beach."
motion_prompt = "The flames move in [u2] motion."
token = "[v2]"
motion_token = "[u2]"
''')
    assert cli_main(["personalize", "--config", str(toml), "--device", "cpu"]) == 0
    concept = load_concept(tmp_path / "two.safetensors")
    assert set(concept.tokens) == {"[v1]", "[u1]", "[v2]", "[u2]"}
    assert concept.train_config["pair_layout"] == "side_by_side"
    assert len(list((tmp_path / "two.work" / "cache").glob("stitched-stage*"))) == 4  # both orders, 2 stages


def test_compile_flag_compiles_the_blocks_after_the_lora_is_in(sp_model_path, tmp_path, video, monkeypatch):
    """--compile / compile = true reaches DiT.compile_blocks once, with the LoRA already injected (compiled
    blocks must hold it); --grad-checkpointing reaches the model. (Compiling for real takes minutes on the
    CPU; the H100 run measured it: benchmarks/results/.)"""
    seen = []

    def record(self, **kwargs):
        seen.append((any(isinstance(m, LoRALinear) for m in self.modules()), self.gradient_checkpointing))

    monkeypatch.setattr(DiT, "compile_blocks", record)
    monkeypatch.setattr("setseq.cmd_personalize.load_base", lambda *a, **k: make_base(sp_model_path))
    argv = ["personalize", str(video), "--prompt", PROMPT, "--motion-prompt", MOTION, "--base", "tiny",
            "--out", str(tmp_path / "c.safetensors"), "--steps1", "1", "--steps2", "1", "--prior-count", "0",
            "--batch-size", "2", "--device", "cpu", "--compile", "--grad-checkpointing"]
    assert cli_main(argv) == 0
    assert seen == [(True, True)]


def test_cli_bad_prompt_exits_2_with_one_clear_line(sp_model_path, tmp_path, video, capsys):
    out = tmp_path / "x.safetensors"
    code = cli_main(["personalize", video, "--prompt", "a square", "--motion-prompt", MOTION,
                     "--base", "tiny", "--tokenizer", sp_model_path, "--out", str(out), "--device", "cpu"])
    assert code == 2 and not out.exists()
    assert "does not contain [v]" in capsys.readouterr().err


def test_batch_context_gradient_is_the_same_on_every_run_with_two_threads():
    """Rows repeat in a batch; their gradient must not depend on how threads accumulate them (the backward
    of context[prompt] did: 20 of 20 runs differed)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    rows, length, dim = 3, 64, 256
    table = SimpleNamespace(context=torch.randn(rows, length, dim, generator=g),
                            trainable=torch.ones(rows, dtype=torch.bool),
                            ids=torch.zeros(rows, length, dtype=torch.long),
                            mask=torch.ones(rows, length, dtype=torch.bool))
    embed = torch.nn.Parameter(torch.randn(rows, length, dim, generator=g))
    t5 = lambda ids, mask: embed  # noqa: E731  (a text encoder whose output is the trained tensor)
    prompt = torch.randint(0, rows, (64,), generator=g)
    weight = torch.randn(64, length, dim, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = set()
        for _ in range(10):
            context, _ = batch_context(SimpleNamespace(prompts=table), prompt, t5, True)
            (grad,) = torch.autograd.grad((context * weight).sum(), embed)
            seen.add(grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1
