"""Small inputs several test modules build: a clip of a moving square, a tiny original-layout Wan release."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from model.config import PRESETS, T5Config
from model.dit import DiT
from model.t5 import T5Encoder
from weights.io import write_safetensors_atomic

# A Wan-2.1-shaped DiT and umT5 small enough to convert in a second.
TINY_WAN_DIT = dataclasses.replace(PRESETS["wan2.1-1.3b"].dit, dim=24, heads=2, layers=2, ffn_dim=40,
                                   text_dim=32)
TINY_UMT5 = T5Config(vocab_size=50, dim=32, head_dim=8, heads=4, ffn_dim=48, layers=2,
                     per_layer_position_bias=True)

# A two-expert (Wan 2.2 A14B-like) config at tiny size: the A14B switch, shift and per-stage guidance.
_TINY = PRESETS["tiny"]
SMALL_PAIR = dataclasses.replace(
    _TINY, name="a14b-test",
    dit=dataclasses.replace(_TINY.dit, dim=64, heads=2, layers=2, ffn_dim=128, rope_split=(12, 10, 10),
                            self_cond=False, prediction="velocity"),
    t5=dataclasses.replace(_TINY.t5, layers=1),
    sample_shift=12.0, guidance=4.0, low_noise_guidance=3.0, boundary=0.875, sample_steps=4)


def square_video(frames: int = 13, size: int = 32) -> torch.Tensor:
    """(3, T, H, W): a bright square moving right on grey."""
    video = torch.full((3, frames, size, size), -0.4)
    for i in range(frames):
        video[0, i, 8:20, i : i + 12] = 1.0
        video[1:, i, 8:20, i : i + 12] = -1.0
    return video


def write_wan_release(src: Path, sp_model_path: str, dit: DiT, t5: T5Encoder) -> None:
    """`dit` and `t5` as Wan ships them: the DiT in two safetensors shards with an index and Wan's
    config.json (no text_dim, as in real releases), the umT5 as a bf16 .pth, the tokenizer beside."""
    src.mkdir(parents=True, exist_ok=True)
    sd = dit.state_dict()
    keys = sorted(sd)
    shards = {k: f"diffusion_pytorch_model-0000{1 + (i >= 9)}-of-00002.safetensors"
              for i, k in enumerate(keys)}
    for shard in sorted(set(shards.values())):
        write_safetensors_atomic(src / shard, {k: sd[k] for k in keys if shards[k] == shard})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    c = dit.cfg
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": c.dim, "eps": c.eps, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
        "in_dim": c.in_channels, "model_type": "t2v", "num_heads": c.heads, "num_layers": c.layers,
        "out_dim": c.out_channels, "text_len": 512}))
    t5_bf16 = {k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}  # as Wan ships it
    torch.save(t5_bf16, src / "models_t5_umt5-xxl-enc-bf16.pth")
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(sp_model_path, src / "google" / "umt5-xxl" / "spiece.model")


def as_torchrun_rank(rank: int, port: int, world: int = 2) -> None:
    """The environment torchrun gives a worker, for a process `torch.multiprocessing.spawn` started: then
    train.distributed.process_group joins (and leaves) the group as in a real run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def spawn_two_ranks(worker, *args) -> None:
    """Run `worker(rank, port, *args)` in 2 new processes, `port` a free one on this machine for their group
    (each calls as_torchrun_rank(rank, port) and joins through train.distributed.process_group)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, *args), nprocs=2)
