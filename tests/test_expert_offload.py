"""Idle-expert offload (ExpertPair.offload_idle, `setseq generate --offload-idle-expert`): sampling with it is
bit-identical to sampling without; the experts move at the right moments (the high-noise expert on the device
through the high-noise stage, the low-noise one through the rest, never both); the memory flags that cannot
join it are refused before any weights load; on CUDA the peak memory drops by about one expert."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.dit import DiT
from model.experts import ExpertPair
from model.offload import BlockOffload
from sample.sampler import sample_latents
from tests.makers import SMALL_PAIR


def _dit(cfg, seed: int) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(cfg).eval()
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)  # a zero head would give v = 0 whatever the expert
    return dit


def _pair(cfg=SMALL_PAIR.dit) -> ExpertPair:
    return ExpertPair(_dit(cfg, 0), _dit(cfg, 1), SMALL_PAIR.boundary).requires_grad_(False)


def _sample(pair, steps: int = 8, shift: float = 3.0, device="cpu") -> torch.Tensor:
    shape = (2, pair.cfg.in_channels, 2, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    ctx = torch.randn((2, 5, pair.cfg.text_dim), generator=torch.Generator().manual_seed(4)).to(device)
    uncond = torch.zeros(1, 3, pair.cfg.text_dim, device=device)
    return sample_latents(pair, noise, (ctx, None), (uncond, None), steps=steps, guidance=4.0, shift=shift,
                          low_noise_guidance=3.0)


class _Places:
    """Each expert's `.to` recorded instead of run (host and device are one CPU here), and at each forward
    where the recorded moves have put both experts."""

    def __init__(self, pair: ExpertPair, monkeypatch):
        self.where = {"high": "cuda", "low": "cuda"}  # as loaded without offload: both on the device
        self.moves: list[tuple[str, str]] = []
        self.calls: list[tuple[str, dict[str, str]]] = []
        for name in self.where:
            expert = pair.expert(name)
            monkeypatch.setattr(expert, "to", lambda device, name=name, expert=expert: self._to(name, device,
                                                                                              expert))
            expert.register_forward_pre_hook(lambda _m, _a, name=name: self.calls.append((name,
                                                                                          dict(self.where))))

    def _to(self, name: str, device, expert):
        self.where[name] = torch.device(device).type
        self.moves.append((name, self.where[name]))
        on_device = [n for n, d in self.where.items() if d == "cuda"]
        assert len(on_device) <= 1, f"both experts on the device after {self.moves}"
        return expert


@torch.no_grad()
def test_offload_sampling_is_bit_identical_and_moves_at_the_switch(monkeypatch):
    pair = _pair()
    want = _sample(pair)
    places = _Places(pair, monkeypatch)
    pair.offload_idle("cuda")  # recorded moves only: the weights stay where they are (the CPU)
    assert places.moves == [("low", "cpu"), ("high", "cuda")]  # the idle one leaves first
    got = _sample(pair)
    assert torch.equal(got, want)
    # 8 steps at shift 3: t = 1, 0.955, 0.9 (high-noise), then 5 low-noise steps; one forward a step (CFG
    # batches cond and uncond together)
    assert [name for name, _ in places.calls] == ["high"] * 3 + ["low"] * 5
    for name, where in places.calls:  # the running expert on the device, the other on the host
        assert where == {name: "cuda", ("low" if name == "high" else "high"): "cpu"}, (name, where)
    assert places.moves == [("low", "cpu"), ("high", "cuda"), ("high", "cpu"), ("low", "cuda")]
    assert torch.equal(_sample(pair), want)  # the next run swaps back at its first step, once
    assert places.moves[4:] == [("low", "cpu"), ("high", "cuda"), ("high", "cpu"), ("low", "cuda")]


@pytest.mark.parametrize("base_dtype", [None, "fp8"])
@torch.no_grad()
def test_offload_generation_from_a_checkpoint_is_bit_identical(tmp_path, sp_model_path, base_dtype):
    """load_base(offload_idle_expert=True) -> generate_batch: the same video as without, fp8 weights too
    (Pipeline.device stays the text encoder's while one expert waits on the CPU)."""
    from model.t5 import T5Encoder
    from model.vae import VAE
    from sample.generate import GenerateConfig, Pipeline, generate_batch
    from weights.base import load_base
    from weights.checkpoint import save_checkpoint

    torch.manual_seed(2)
    save_checkpoint(tmp_path / "base", SMALL_PAIR, _pair(), VAE(SMALL_PAIR.vae), T5Encoder(SMALL_PAIR.t5),
                    tokenizer_path=sp_model_path)
    gen = GenerateConfig(frames=5, size=(32, 32), seed=0)
    videos = []
    for offload in (False, True):
        pipe = Pipeline.of(load_base(tmp_path / "base", device="cpu", base_dtype=base_dtype,
                                     offload_idle_expert=offload))
        assert pipe.dit.offload_device == (torch.device("cpu") if offload else None)
        assert any(type(m).__name__ == "FP8Linear" for m in pipe.dit.low.modules()) == (base_dtype == "fp8")
        videos.append(generate_batch(pipe, "a red square moving right.", gen, [0, 1]))
        assert pipe.dit.resident == ("low" if offload else None) and pipe.device == torch.device("cpu")
    pipe.dit.high.to("meta")  # wherever an expert waits, the pipeline runs where its text encoder is
    assert pipe.device == torch.device("cpu")
    for a, b in zip(*videos, strict=True):
        assert torch.equal(a, b)


def test_offload_is_for_sampling_only():
    pair = _pair()
    pair.offload_idle("cpu")
    x, ctx = torch.zeros(2, pair.cfg.in_channels, 2, 4, 4), torch.zeros(2, 5, pair.cfg.text_dim)
    with pytest.raises(ValueError, match="idle-expert offload is for sampling: this forward needs gradients"):
        pair(x, torch.tensor([0.9, 0.9]), ctx)  # grad mode on, as in personalization
    with torch.no_grad(), pytest.raises(ValueError, match="mixes times of both experts"):
        pair(x, torch.tensor([0.9, 0.5]), ctx)


def test_offload_refuses_block_offload():
    pair = _pair()
    BlockOffload(pair.high, pair.high.blocks, 1, "cpu")
    with pytest.raises(ValueError, match="--offload-idle-expert with --offload-blocks: .*drop one of"):
        pair.offload_idle("cpu")
    assert pair.offload_device is None


def test_memory_flags_refused_before_loading():
    from weights.base import check_memory_options, load_base

    with pytest.raises(ValueError, match="base 'tiny' has one DiT .*drop the flag"):
        load_base("tiny", random_weights=True, device="cpu", offload_idle_expert=True)
    with pytest.raises(ValueError, match="--offload-idle-expert with --offload-blocks"):
        check_memory_options(SMALL_PAIR, None, 1, offload_idle_expert=True)
    check_memory_options(SMALL_PAIR, None, 0, offload_idle_expert=True)  # alone: fine


def test_generate_cli_offloads_the_idle_expert(tmp_path, sp_model_path, capsys):
    from model.t5 import T5Encoder
    from model.vae import VAE
    from setseq.cli import main
    from weights.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "base", SMALL_PAIR, _pair(), VAE(SMALL_PAIR.vae), T5Encoder(SMALL_PAIR.t5),
                    tokenizer_path=sp_model_path)
    args = ["generate", "--base", str(tmp_path / "base"), "--prompt", "a red square moving right.",
            "--frames", "5", "--size", "32x32", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "v.mp4")]
    assert main([*args, "--offload-idle-expert"]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "--offload-idle-expert on the CPU saves no memory" in err
    assert main([*args[:-1], str(tmp_path / "w.mp4"), "--offload-idle-expert", "--offload-blocks", "1"]) == 2
    assert "--offload-idle-expert with --offload-blocks" in capsys.readouterr().err


def test_flag_is_generate_only(capsys):
    from setseq.cli import main

    args = ["--base", "tiny", "--random-weights", "--prompt", "a square.", "--out", "x.mp4"]
    assert main(["generate", *args, "--offload-idle-expert"]) == 2
    assert "base 'tiny' has one DiT (no second expert to offload)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # personalize trains both experts each step: it has no such flag
        main(["personalize", "--base", "tiny", "--offload-idle-expert"])
    assert "unrecognized arguments: --offload-idle-expert" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_cuda_offload_drops_peak_memory_by_an_expert():
    cfg = dataclasses.replace(SMALL_PAIR.dit, dim=1024, heads=8, layers=8, ffn_dim=4096, rope_split=None)
    pair = _pair(cfg).cuda()
    expert_bytes = sum(p.numel() * p.element_size() for p in pair.high.parameters())
    seen = []
    for name in ("high", "low"):
        pair.expert(name).register_forward_pre_hook(lambda _m, _a, name=name: seen.append(
            (name, next(pair.high.parameters()).device.type, next(pair.low.parameters()).device.type)))
    peaks, outs = [], []
    for offload in (False, True):
        if offload:
            pair.offload_idle("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        outs.append(_sample(pair, device="cuda"))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert torch.equal(outs[0], outs[1])
    assert peaks[1] <= peaks[0] - 0.9 * expert_bytes, (peaks, expert_bytes)
    ran = seen[len(seen) // 2:]  # the offloaded run: the running expert on the GPU, the other on the CPU
    assert [r[0] for r in ran] == ["high"] * 3 + ["low"] * 5
    assert all((h, lo) == (("cuda", "cpu") if name == "high" else ("cpu", "cuda")) for name, h, lo in ran)
