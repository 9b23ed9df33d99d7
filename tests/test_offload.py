"""Block offload (model/offload.py) with host and device both the CPU: the same outputs and gradients bit
for bit as no offload (with and without gradient checkpointing, fp32 and fp8 weights), the hook schedule
(what is loaded, waited on and evicted, in which order) and how many offloaded blocks are resident."""

from __future__ import annotations

import copy

import pytest
import torch

from lora.concept import base_weights_hash
from lora.inject import inject_lora, remove_concept, set_stage
from model import fp8 as F8
from model.config import DiTConfig
from model.dit import DiT
from model.offload import BlockOffload
from weights.base import load_base

CFG = DiTConfig(in_channels=4, out_channels=4, dim=64, heads=4, layers=4, ffn_dim=128, text_dim=32)


def pair(fp8: bool = False, n: int = 2) -> list[DiT]:
    """`n` identical frozen DiTs (a random head: a zero one passes no gradient)."""
    torch.manual_seed(0)
    dit = DiT(CFG)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)
    if fp8:
        F8.quantize_linears(dit)
    dit.requires_grad_(False)
    return [dit] + [copy.deepcopy(dit) for _ in range(n - 1)]


def with_lora(dit: DiT) -> DiT:
    torch.manual_seed(1)
    inject_lora(dit, rank=4, name="c")
    set_stage(dit, 1, dropout=0.0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("lora_B1"):
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return dit.train()


def step(dit: DiT, context_grad: bool = False):
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2, generator=g)
    c = torch.randn(2, 5, 32, generator=g).requires_grad_(context_grad)  # trained token rows reach here
    dit.zero_grad(set_to_none=True)
    y = dit(x, t, c)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in dit.named_parameters() if p.grad is not None}
    return y.detach(), grads, c.grad


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("count, ahead, fp8", [(3, 1, False), (1, 1, False), (3, 2, True)])
def test_offloaded_step_equals_the_plain_one_bit_for_bit(checkpointing, count, ahead, fp8):
    """Outputs and adapter gradients equal a hook-free model's bit for bit. The text context's gradient
    (a sum over every block) equals a model with the same hooks and nothing offloaded (count 0) bit for
    bit; against the hook-free model it differs by rounding (2e-7 relative): the hooks' extra autograd
    nodes change the order in which the engine adds the blocks' contributions."""
    if fp8 and F8.FP8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    plain, hooked, off = pair(fp8, 3)
    BlockOffload(hooked, hooked.blocks, 0, "cpu")
    offload = BlockOffload(off, off.blocks, count, "cpu", ahead=ahead)  # before the adapters, as load_base
    for dit in (plain, hooked, off):
        with_lora(dit).gradient_checkpointing = checkpointing
    for _ in range(2):  # a second step starts from the state the first left
        y0, g0, c0 = step(plain, context_grad=True)
        _, _, c_hooked = step(hooked, context_grad=True)
        y1, g1, c1 = step(off, context_grad=True)
        assert torch.equal(y0, y1)
        assert g0.keys() == g1.keys() and len(g0) == 10 * CFG.layers * 2  # A1, B1 of every targeted linear
        assert all(torch.equal(g0[k], g1[k]) for k in g0)
        assert torch.equal(c1, c_hooked)
        assert torch.allclose(c1, c0, rtol=1e-5, atol=1e-6 * float(c0.abs().max()))
        assert offload.resident() == [] and offload.max_resident <= 1 + ahead
    with torch.no_grad():
        assert torch.equal(plain(*step_inputs()), off(*step_inputs()))


def step_inputs():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 3, 8, 8, generator=g), torch.rand(1, generator=g)
    return x, t, torch.randn(1, 5, 32, generator=g)


def test_an_evicted_block_holds_nan_placeholders_not_its_weights():
    plain, off = pair()
    BlockOffload(off, off.blocks, 2, "cpu")
    for dit in (plain, off):
        inject_lora(dit, rank=2, name="c")
    # what reads weights outside a forward (train/step.AdapterGrowth) reads the host copy
    assert torch.equal(off.blocks[3].ffn[0].base_norm(), plain.blocks[3].ffn[0].weight.norm())
    assert base_weights_hash(off) == base_weights_hash(plain)  # what a concept file records of its base
    remove_concept(off, "c")
    assert off.blocks[3].ffn[0].weight.isnan().all() and off.blocks[3].ffn[0].weight.shape == (128, 64)
    assert not off.blocks[1].ffn[0].weight.isnan().any()  # not offloaded
    with torch.no_grad():
        assert not off(*step_inputs()).isnan().any()  # the hooks bring every block in before its use
    assert off.blocks[3].ffn[0].weight.isnan().all()  # and out again after it


@pytest.mark.parametrize("checkpointing", [False, True])
def test_schedule_prefetches_one_ahead_in_the_forward_and_the_backward(checkpointing):
    """Blocks 1-3 of 4 offloaded, prefetch 1: each is loaded while the block before it (in the forward)
    or after it (in the backward) runs, waited on just before its own use, evicted right after it; the
    last block stays for the backward that starts with it. Checkpointing's recompute changes nothing."""
    _, off = pair()
    offload = BlockOffload(off, off.blocks, 3, "cpu")
    with_lora(off).gradient_checkpointing = checkpointing
    step(off)
    assert offload.log == [
        ("load", 1),  # at the pass's start (patchify, time MLP): the first offloaded use
        ("wait", 1), ("load", 2), ("evict", 1),
        ("wait", 2), ("load", 3), ("evict", 2),
        ("wait", 3),  # forward of 3 done: kept, the backward begins with it
        ("load", 2), ("evict", 3),  # backward of 3 (recompute included): prefetch 2
        ("wait", 2), ("load", 1), ("evict", 2),
        ("wait", 1), ("evict", 1),
    ]
    assert offload.max_resident == 2


def test_inference_passes_evict_everything_and_prefetch_further_with_ahead_2():
    _, off = pair()
    offload = BlockOffload(off, off.blocks, 3, "cpu", ahead=2)
    with torch.no_grad():
        off(*step_inputs())
    assert offload.log == [("load", 1), ("load", 2), ("wait", 1), ("load", 3), ("evict", 1), ("wait", 2),
                           ("evict", 2), ("wait", 3), ("evict", 3)]
    assert offload.max_resident == 3 and offload.resident() == []


def test_remove_restores_the_plain_model():
    plain, off = pair()
    offload = BlockOffload(off, off.blocks, 3, "cpu")
    offload.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values(),
                                                strict=True))
    with torch.no_grad():
        off(*step_inputs())
    assert offload.log == []


def test_block_count_is_checked():
    _, off = pair()
    with pytest.raises(ValueError, match=r"--offload-blocks 4: the model has 4 blocks.*choose 0\.\.3"):
        BlockOffload(off, off.blocks, 4, "cpu")


def test_load_base_offloads_the_last_blocks_and_matches_the_plain_base():
    plain = load_base("tiny", device="cpu")
    off = load_base("tiny", device="cpu", offload_blocks=2, base_dtype="fp8" if F8.FP8 is not None else None)
    if F8.FP8 is not None:
        F8.quantize_linears(plain.dit)
    assert off.dit.blocks[3].self_attn.q.weight.isnan().all() and off.device.type == "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 160, 2, 4, 4, generator=g)
    t, c = torch.rand(1, generator=g), torch.randn(1, 6, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(plain.dit(x, t, c), off.dit(x, t, c))


def test_cli_personalize_with_fp8_and_offload_writes_the_concept_of_fp8_alone(tmp_path, capsys):
    """End to end through the flags: the committed tiny base, fp8 weights, 2 of 4 blocks offloaded, gradient
    checkpointing; the concept equals the run without offload bit for bit (tokens untrained, so no gradient
    sums over blocks: see the context note above)."""
    if F8.FP8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    from lora.concept import load_concept
    from setseq.cli import main as cli_main
    from train.video import write_video

    video = torch.full((3, 9, 64, 64), -0.4)
    for i in range(9):
        video[:, i, 20:36, 4 * i : 4 * i + 16] = 1.0
    write_video(tmp_path / "v.mp4", video, fps=8)
    concepts = {}
    for name, extra in (("plain", []), ("offload", ["--offload-blocks", "2"])):
        out = tmp_path / f"{name}.safetensors"
        assert cli_main(["personalize", str(tmp_path / "v.mp4"), "--prompt", "a [v] square on grey.",
                         "--motion-prompt", "it is [u] moving right.", "--base", "tiny", "--out", str(out),
                         "--steps1", "2", "--steps2", "2", "--batch-size", "2", "--rank", "4",
                         "--prior-count", "0", "--no-train-tokens", "--grad-checkpointing", "--device", "cpu",
                         "--base-dtype", "fp8", *extra]) == 0
        concepts[name] = load_concept(out).lora
    assert "--offload-blocks on the CPU saves no memory" in capsys.readouterr().err
    assert concepts["plain"].keys() == concepts["offload"].keys()
    assert all(torch.equal(v, concepts["offload"][k]) for k, v in concepts["plain"].items())
    assert any(float(v.abs().sum()) > 0 for k, v in concepts["plain"].items() if k.endswith("lora_B2"))


@pytest.mark.parametrize("flags, message", [
    (["--offload-blocks", "4"], "--offload-blocks 4: base 'tiny' has 4 DiT blocks"),
    (["--offload-blocks", "-1"], "'-1': expected a whole number >= 0"),
    (["--offload-blocks", "2", "--compile"], "--compile with --offload-blocks"),
])
def test_cli_refuses_bad_memory_flags_in_one_line(tmp_path, capsys, flags, message):
    from setseq.cli import main as cli_main

    (tmp_path / "v.mp4").write_bytes(b"")
    rc = None
    try:
        rc = cli_main(["personalize", str(tmp_path / "v.mp4"), "--prompt", "a [v] square.", "--base", "tiny",
                       "--out", str(tmp_path / "c.safetensors"), "--device", "cpu", *flags])
    except SystemExit as exit_:  # argparse's own refusal
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_generate_with_fp8_and_offload_gives_the_video_of_fp8_alone(tmp_path):
    if F8.FP8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    from setseq.cli import main as cli_main

    for name, extra in (("plain", []), ("offload", ["--offload-blocks", "3"])):
        assert cli_main(["generate", "--base", "tiny", "--prompt", "a red square moves left on blue",
                         "--steps", "2", "--out", str(tmp_path / f"{name}.mp4"), "--no-progress", "--device",
                         "cpu", "--base-dtype", "fp8", *extra]) == 0
    assert (tmp_path / "plain.gif").read_bytes() == (tmp_path / "offload.gif").read_bytes()


def test_memory_benchmark_runs_every_configuration_in_tiny_mode(tmp_path, capsys):
    """benchmarks/bench_memory.py --tiny: each configuration runs a LoRA step on the CPU and gets its rows
    (no timing is asserted: the CPU check measures nothing a GPU would, so no goal is judged either)."""
    import json

    from benchmarks.bench_memory import build_parser, run
    from benchmarks.timing import main_of

    assert main_of(run, build_parser(), ["--tiny", "--repeats", "1", "--json", str(tmp_path / "m.json")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    peaks = [r["metric"] for r in rows if r["metric"].startswith("peak")]
    assert peaks == [f"peak (tiny 9x64x64 {c})" for c in
                     ("fp32", "fp8", "fp8 + offload 1", "fp8 + offload 2", "fp8 + offload 3")]
    assert all(r["ok"] is None and r["value"] > 0 for r in rows)
    assert "at most 2 offloaded blocks resident" in capsys.readouterr().out


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_offload_matches_and_frees_the_blocks(fp8):
    """On a GPU: the offloaded blocks leave the device (allocated memory drops by their bytes, to within the
    placeholders), and a checkpointed bf16-autocast step matches the plain one (1e-5: flash attention's
    backward is not bit-deterministic)."""
    if fp8 and F8.FP8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    plain, off = (d.cuda() for d in pair(fp8))
    before = torch.cuda.memory_allocated()
    block_bytes = sum(t.nelement() * t.element_size() for b in off.blocks[1:] for t in
                      (*b.parameters(), *b.buffers()))
    offload = BlockOffload(off, off.blocks, 3, "cuda")
    freed = before - torch.cuda.memory_allocated()
    assert abs(freed - block_bytes) <= 4096 * 64, (freed, block_bytes)
    assert all(h.is_pinned() for s in offload.slots.values() for h in s.host)
    for dit in (plain, off):
        with_lora(dit).gradient_checkpointing = True
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 8, 8, generator=g).cuda(), torch.rand(2, generator=g).cuda()
    c = torch.randn(2, 5, 32, generator=g).cuda()
    results = []
    for dit in (plain, off):
        dit.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = dit(x, t, c)
        y.float().square().mean().backward()
        grads = {n: p.grad.float() for n, p in dit.named_parameters() if p.grad is not None}
        results.append((y.float(), grads))
    (y0, g0), (y1, g1) = results
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-5) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-6) for k in g0)
    assert offload.resident() == [] and offload.max_resident == 2


def test_load_base_offloads_each_expert_of_a_two_expert_base(tmp_path, sp_model_path):
    """A Wan 2.2 A14B-style base (model/experts.ExpertPair): each expert keeps its own last K blocks on the
    host; the pair's velocity equals the plain load's at a high-noise and a low-noise time."""
    import dataclasses

    from model.config import PRESETS
    from model.experts import ExpertPair
    from model.t5 import T5Encoder
    from model.vae import VAE
    from weights.checkpoint import save_checkpoint

    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, name="pair-test", boundary=0.875,
                              dit=dataclasses.replace(tiny.dit, dim=64, heads=2, layers=3, ffn_dim=128,
                                                      rope_split=(12, 10, 10), self_cond=False,
                                                      prediction="velocity"),
                              t5=dataclasses.replace(tiny.t5, layers=1))
    torch.manual_seed(0)
    pair = ExpertPair(DiT(cfg.dit), DiT(cfg.dit), cfg.boundary)
    for expert in (pair.high, pair.low):
        torch.nn.init.normal_(expert.head.head.weight, std=0.05)
    save_checkpoint(tmp_path / "base", cfg, pair, VAE(cfg.vae), T5Encoder(cfg.t5),
                    tokenizer_path=sp_model_path)
    plain = load_base(tmp_path / "base", device="cpu")
    off = load_base(tmp_path / "base", device="cpu", offload_blocks=2)
    assert all(e.blocks[2].ffn[0].weight.isnan().all() for e in (off.dit.high, off.dit.low))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 160, 2, 4, 4, generator=g), torch.randn(1, 6, 64, generator=g)
    with torch.no_grad():
        for t in (0.95, 0.3):
            tt = torch.tensor([t])
            assert torch.equal(plain.dit(x, tt, c), off.dit(x, tt, c))
