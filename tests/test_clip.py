"""model/clip.py, weights/clip.py and sample/clip.py against transformers' CLIPModel and
CLIPImageProcessor (a tiny random CLIP saved the way HF saves one), and CLIP-T's definition."""

import json

import numpy as np
import pytest
import torch

from model.clip import OPENAI_STD, ClipConfig, TextTower, TowerConfig
from sample.clip import ClipTextScorer
from weights.clip import load_clip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(clip_folder):
    return clip_folder

def test_towers_match_transformers(folder):
    path, ref = folder
    ours, _, _ = load_clip(path)
    ids = torch.tensor([[512, 5, 77, 300, 41, 513], [512, 9, 513, 513, 513, 513]])  # second one padded
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want_text = ref.get_text_features(input_ids=ids)
        want_image = ref.get_image_features(pixel_values=pixels)
        want_text = getattr(want_text, "pooler_output", want_text)
        want_image = getattr(want_image, "pooler_output", want_image)
        got_text = ours.text_projection(ours.text_model(ids))
        got_image = ours.visual_projection(ours.vision_model(pixels))
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_image, want_image, rtol=1e-5, atol=1e-5)


def test_legacy_eos_rule_pools_at_the_largest_id():
    c = ClipConfig(TowerConfig(16, 1, 2, 32), TowerConfig(16, 1, 2, 32), vocab_size=20,
                   max_positions=8, image_size=16, patch_size=8, projection_dim=8, eos_token_id=2)
    tower = TextTower(c).eval()
    ids = torch.tensor([[3, 19, 4, 5]])
    with torch.no_grad():
        pooled = tower(ids)
        full = tower.final_layer_norm(tower.encoder(tower.embeddings(ids), causal=True))
    torch.testing.assert_close(pooled[0], full[0, 1])


def test_preprocess_matches_clip_image_processor(folder):
    path, _ = folder
    processor = transformers.CLIPImageProcessor.from_pretrained(path)
    _, _, ours = load_clip(path)
    rng = np.random.default_rng(0)
    # Smooth content (as video frames are) at three shapes: wide, tall, and already the crop size.
    for h, w in ((48, 80), (90, 40), (32, 32)):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([127 + 120 * np.sin(xx / 7 + c) * np.cos(yy / 9 - c) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        want = torch.as_tensor(np.asarray(processor(images=[img], return_tensors="np")["pixel_values"]))
        got = ours(torch.from_numpy(img)[None])
        assert got.shape == want.shape
        # PIL's and torch's antialiased bicubic round differently: allow 2 uint8 levels, after normalising.
        assert (got - want).abs().max() <= 2 / 255 / min(OPENAI_STD) + 1e-5, (h, w)
        if (h, w) == (32, 32):  # no resize: exact
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def test_clip_t_is_the_cosine_of_text_and_mean_frame_embedding(folder):
    path, ref = folder
    scorer = ClipTextScorer(*load_clip(path))
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessor.from_pretrained(path)
    with torch.no_grad():
        pixels = processor(images=list(frames), return_tensors="np")["pixel_values"]
        pixels = torch.as_tensor(np.asarray(pixels))
        image = ref.get_image_features(pixel_values=pixels)
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image), dim=-1)
        ids = torch.tensor([scorer.tokenizer.encode("a red square moving left", max_length=32)])
        text = ref.get_text_features(input_ids=ids)
        text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)[0]
    want = float(torch.nn.functional.normalize(image.mean(0), dim=0) @ text)
    # Concept placeholders are dropped before CLIP sees the prompt.
    got = scorer(frames, "a [v] red square [u] moving left")
    assert got == pytest.approx(want, abs=2e-3)  # 2e-3: the preprocessing's rounding differences above
    assert -1 <= got <= 1


def test_bad_folders_say_what_is_expected(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="HF CLIP folder"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        load_clip(tmp_path)
