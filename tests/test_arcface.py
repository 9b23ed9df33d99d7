"""model/arcface.py, weights/arcface.py, sample/arcface.py: insightface IResNet layout, strict loading, and
the ID score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from model.arcface import IResNet
from sample.arcface import ArcFaceScorer, face_embeddings
from weights.arcface import load_arcface

LAYERS = [2, 1, 1, 1]  # stage 1 has two blocks: one with a downsample, one without
FEATURES = 64  # smaller than the real 512 to keep the fc (25088 x D) cheap; the loader must infer it


def _randomise(model: IResNet, seed: int) -> IResNet:
    """Random running stats and affine for every BatchNorm, random PReLU slopes: no tensor is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.num_parameters, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> IResNet:
    torch.manual_seed(0)
    return _randomise(IResNet(LAYERS, FEATURES), seed=1)


@pytest.fixture(scope="module")
def scorer_model() -> IResNet:
    # Default BatchNorm stats: with random ones every input maps to nearly one direction (cos ~0.99),
    # which would hide whether the score tells videos apart.
    torch.manual_seed(0)
    return IResNet([1, 1, 1, 1]).eval()


def _input(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))  # (B, 3, 112, 112)


def _video(t: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)  # (T, H, W, 3)


# ----------------------------------------------------------- an independent forward, by key name


def _bn(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-5)


def _block(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    """insightface IBasicBlock: bn1, conv1, bn2, prelu, conv2 (strided), bn3, plus identity/downsample."""
    has_downsample = f"{name}.downsample.0.weight" in sd
    stride = 2 if has_downsample else 1
    out = F.conv2d(_bn(x, sd, f"{name}.bn1"), sd[f"{name}.conv1.weight"], padding=1)
    out = F.prelu(_bn(out, sd, f"{name}.bn2"), sd[f"{name}.prelu.weight"])
    out = _bn(F.conv2d(out, sd[f"{name}.conv2.weight"], stride=stride, padding=1), sd, f"{name}.bn3")
    if has_downsample:
        x = _bn(F.conv2d(x, sd[f"{name}.downsample.0.weight"], stride=2), sd, f"{name}.downsample.1")
    return out + x


def _functional_iresnet(x: Tensor, sd: dict[str, Tensor], layers: list[int]) -> Tensor:
    x = F.prelu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for k in range(blocks):
            x = _block(x, sd, f"layer{stage}.{k}")
    x = _bn(x, sd, "bn2").flatten(1)
    return _bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), sd, "features")


def _close(a: Tensor, b: Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_forward_matches_insightface_block_order(model):
    x = _input()
    with torch.no_grad():
        got = model(x)
        want = _functional_iresnet(x, model.state_dict(), LAYERS)
    assert got.shape == (2, FEATURES)
    assert _close(got, want)


def test_first_block_of_every_stage_downsamples(model):
    keys = model.state_dict().keys()
    assert all(f"layer{s}.0.downsample.0.weight" in keys for s in range(1, 5))
    assert "layer1.1.downsample.0.weight" not in keys


# ------------------------------------------------------------------------------------------ loading


def _dataparallel_state(model: IResNet) -> dict[str, Tensor]:
    """As DataParallel saves it: `module.` prefix, with num_batches_tracked buffers."""
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_infers_depth_and_width_and_reproduces_outputs(model, tmp_path, suffix):
    state = _dataparallel_state(model)
    assert any(k.endswith("num_batches_tracked") for k in state)
    path = tmp_path / f"backbone{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    loaded = load_arcface(path)
    assert [len(loaded.get_submodule(f"layer{s}")) for s in range(1, 5)] == LAYERS
    assert loaded.fc.out_features == FEATURES
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = _input(batch=1)
    with torch.no_grad():  # equal weights; outputs to rounding (CPU kernels differ with memory alignment)
        assert _close(loaded(x), model(x), rel=1e-6)


def test_load_accepts_a_file_without_num_batches_tracked(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "backbone.pth")
    loaded = load_arcface(tmp_path / "backbone.pth")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_missing_key_is_named(model, tmp_path):
    state = dict(model.state_dict())
    del state["layer3.0.bn2.running_var"]
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"missing keys: 'layer3\.0\.bn2\.running_var'.*arcface_torch"):
        load_arcface(tmp_path / "backbone.pth")


def test_extra_key_is_named(model, tmp_path):
    state = {**model.state_dict(), "head.kernel": torch.zeros(2)}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: 'head\.kernel'.*arcface_torch IResNet"):
        load_arcface(tmp_path / "backbone.pth")


def test_file_without_fc_names_it(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="'fc.weight' missing"):
        load_arcface(tmp_path / "backbone.pth")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_arcface(tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------ scoring


def test_video_against_itself_scores_one_and_unrelated_scores_less(scorer_model):
    scorer = ArcFaceScorer(scorer_model)
    static = np.repeat(_video(t=1, seed=0), 2, axis=0)  # one frame twice: every frame is the reference
    assert scorer(static, static) > 0.999
    assert scorer(_video(seed=1), static) < 0.9


def test_embeddings_are_unit_length(scorer_model):
    emb = face_embeddings(scorer_model, _video(t=3), batch=2)  # two batches: 2 + 1 frames
    assert emb.shape == (3, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_box_selects_its_region(scorer_model):
    box = (0.25, 0.25, 0.75, 0.75)  # on 32 x 48 frames: rows 8..24, columns 12..36
    ref = _video(seed=0)
    outside = _video(seed=1)
    outside[:, 8:24, 12:36] = ref[:, 8:24, 12:36]  # same inside the box, different elsewhere
    inside = ref.copy()
    inside[:, 8:24, 12:36] = outside[:, :16, :24] // 2  # different inside the box
    emb = face_embeddings(scorer_model, np.concatenate([ref, outside, inside]), box)  # (6, D)
    assert torch.allclose(emb[:2], emb[2:4], atol=1e-6)
    assert (emb[:2] * emb[4:]).sum(-1).max() < 0.99


def test_default_box_is_the_centred_square(scorer_model):
    ref = _video(seed=0)  # 32 x 48: the centred square is columns 8..40
    edges = _video(seed=1)
    edges[:, :, 8:40] = ref[:, :, 8:40]
    scorer = ArcFaceScorer(scorer_model)
    assert scorer(edges, ref) == pytest.approx(scorer(ref, ref), abs=1e-6)


@pytest.mark.parametrize("box", [(0.5, 0, 0.4, 1), (0, 0.6, 1, 0.6), (-0.1, 0, 1, 1), (0, 0, 1, 1.5),
                                 (0, 0, 1), (0, 0, float("nan"), 1), "abcd"])
def test_bad_box_is_refused(scorer_model, box):
    with pytest.raises(ValueError, match="box"):
        ArcFaceScorer(scorer_model, box)
    with pytest.raises(ValueError, match="box"):
        face_embeddings(scorer_model, _video(t=1), box)


def test_float_frames_are_refused(scorer_model):
    with pytest.raises(ValueError, match="uint8 frames"):
        face_embeddings(scorer_model, _video(t=1).astype(np.float32))
