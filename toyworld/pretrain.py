"""Pretraining the tiny base model on the toy world, end to end on a CPU: VAE, tokenizer + text
encoder, DiT. `main(cfg)` runs the stages in order; each is resumable from atomic checkpoints in
`cfg.work_dir` and a finished stage is skipped:

    1. VAE        a linear VAE (`tiny`) is fitted in closed form: the PCA of patchified toy clips, the
                  optimal linear autoencoder for MSE (seconds). A conv VAE trains on random crops of
                  fresh toy clips (9 frames, 32x32: 8x cheaper than whole clips), then whole 17x64x64
                  clips; MSE + L1 on pixels. Then the latent mean/std on toy clips go into
                  VAEConfig.latents_mean/std, so the DiT sees unit-scale latents (one pooled std for a
                  linear VAE, which keeps latent distances proportional to pixel distances).
    2. tokenizer  a sentencepiece model trained on every caption of the vocabulary (both splits: the
                  held-out split holds out combinations, never words).
    3. bank       `bank_size` training clips encoded once by the frozen VAE (encoding on the fly would
                  cost as much as a DiT step); captions as token ids.
    4. DiT        flow matching with the DiT's prediction space as loss (x0 for `tiny`), caption
                  dropout for guidance, self-conditioning, EMA; the T5 encoder frozen at its seeded
                  random init or trained jointly (`train_text`). The head's MLP (DiTConfig.head_hidden)
                  stays at its zero-output init here, unless `head_joint` trains it here instead of in 5.
    5. head MLP   the head's MLP alone, everything else frozen (`train_head`; checkpoints "stage3-*").
    6. layout     DiT + T5 further, the T5 with an absolute position, half of each batch at times in
                  (0.97, 1), where only the caption can say which object goes where (`train_layout`;
                  checkpoints "stage4-*").

The toy world is infinite and seeded: the VAE's step s draws clips with seed (cfg.seed, s), so a
resumed run sees the same data. `main` returns the trained parts (EMA weights for the DiT); the
command line (setseq/cmd_pretrain.py) saves them as a checkpoint folder and evaluates them.
Where the stages live: 1 in toyworld/pretrain_vae.py; 2 here; 3-6 in toyworld/pretrain_dit.py; what their
loops share (log, schedule, checked step, EMA, per-stage checkpoints) in toyworld/pretrain_loop.py.
Logs: `work_dir/pretrain.log` (readable) and `work_dir/pretrain.jsonl` (one record per log line).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig, get_preset
from model.dit import DiT
from model.t5 import T5Encoder
from model.tokenizer import Tokenizer, train_tokenizer
from model.vae import VAE
from toyworld.pretrain_dit import build_bank, train_dit, train_head, train_layout
from toyworld.pretrain_loop import Log
from toyworld.pretrain_vae import latent_stats, train_vae
from toyworld.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, ToyWorldConfig, caption_of
from train.checkpoint import latest_checkpoint, load_checkpoint


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    work_dir: str = "runs/pretrain-tiny"
    seed: int = 0
    # torch CPU threads. 1 by default: on a shared 2-core machine a 2-thread job next to any other
    # process ran 10x slower (7 s vs 0.45 s a VAE step), a 1-thread job degrades gracefully.
    threads: int = 1
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    # -- VAE
    vae_steps: int = 900  # crop steps
    # Then whole 17-frame clips: a decoder trained on 3 latent frames alone got the colours of latent
    # frames 3-4 wrong. One cosine spans both phases (pretrain_vae.vae_lr), capped at vae_full_lr on whole
    # clips. (Its horizon was once a separate 1000 steps, past the 900 crop steps: the crops never
    # reached the low-lr end of their schedule.)
    vae_full_steps: int = 150
    vae_full_lr: float = 5e-4
    vae_batch: int = 16
    vae_full_batch: int = 4
    vae_crop: tuple[int, int] = (9, 32)  # (frames, pixels) of a training crop
    vae_lr: float = 2e-3
    vae_l1: float = 0.5  # weight of the L1 term beside the MSE (sharper edges early)
    vae_kl: float = 0.0  # KL term's weight (KL posterior); 0: trains on the posterior mean
    vae_heldout_clips: int = 64  # whole held-out clips whose PSNR each VAE log line reports
    vae_fit_clips: int = 2048  # linear VAE: toy clips whose patch covariance gives the PCA
    stats_clips: int = 256  # clips for the latent mean/std
    # -- text
    tokenizer_vocab: int = 128  # soft limit; the captions hold 26 distinct words
    train_text: bool = True  # train the T5 jointly with the DiT; False = frozen seeded random encoder
    # -- DiT
    bank_size: int = 4096
    dit_steps: int = 24000  # 91 min on 2 threads; motion before the layout stage: 0.63 at 16k, 0.80 at 24k
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.998
    time_dist: str = "logit_normal"  # or "uniform"
    # Shift of the training times toward noise (model.flow.shift_time), as SD3/Wan do for large latents.
    # With 51k latent values per clip the layout is readable from x_t up to t ~ 0.9, and unshifted
    # logit-normal times almost never go past it (P(t > 0.9) = 1.4%): the 16k-step base trained so
    # never learned to lay out motion from the caption (motion at chance), while its x0 estimate at
    # t = 0.8 placed the object within 0.7 px. Shift 5 (the tiny preset's) puts 28% of the times above 0.9.
    time_shift: float | None = None  # None = the preset's sample_shift, so training and sampling agree
    # -- an MLP beside the head's Linear (DiTConfig.head_hidden; None = the preset's head), trained alone
    # after the DiT or with it (head_joint). The tiny head's Linear spans 128 of a token's 640 latent
    # values; 2% of a clip's energy (5% of a striped sprite's, most in moving latent frames) lies outside
    # that span. Both ways measured and not adopted: benchmarks/results/toyworld-base-experiments.md.
    head_hidden: int | None = None
    head_joint: bool = False  # True: the MLP trains with the DiT from step 0, and step 5 is skipped
    head_steps: int = 3000
    head_lr: float = 1e-3
    # -- layout: DiT + T5 trained further, with a learned absolute position added to the T5 and a share of
    # every batch at times in (layout_t, 1), where x_t no longer shows where the objects are and only the
    # caption can. Without it the base put a two-object caption's objects on random sides: it read the
    # layout from x_t and the caption as a bag of words (swapping the objects left its loss at t = 1
    # unchanged). Either half alone did not help in 2000 steps; both did (benchmarks/results/
    # toyworld-base-experiments.md, entry 3). 0 steps = no layout stage.
    layout_steps: int = 2000
    layout_share: float = 0.5
    layout_t: float = 0.97
    layout_lr: float = 1e-3
    self_cond_prob: float = 0.5  # paper: 0.9 in pretraining
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.world, dict):
            self.world = ToyWorldConfig(**self.world)
        if self.time_shift is None:
            self.time_shift = get_preset(self.preset).sample_shift
        self.vae_crop = tuple(self.vae_crop)
        frames, size = self.vae_crop
        if (frames - 1) % 4 or size % 8 or size > self.world.size or frames > self.world.frames:
            raise ValueError(f"vae_crop {self.vae_crop} must be (1 + 4k frames, a multiple of 8 px) within "
                             f"the world's {self.world.frames}x{self.world.size}")
        if not 0 <= self.self_cond_prob <= 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError(f"self_cond_prob {self.self_cond_prob} and caption_dropout "
                             f"{self.caption_dropout} must be probabilities (caption_dropout < 1)")


# Settings a preset trains with unless the caller sets them. The conv VAE beside its PCA skip path trains on
# whole clips with the MSE alone at batch 8 (the L1 term held it at the PCA; crops and batch 4 were below):
# 28.83 dB held-out in 1000 steps (benchmarks/results/toyworld-base-experiments.md, entry 5, row h).
PRESET_RECIPES: dict[str, dict] = {
    "tiny-conv": {"vae_steps": 0, "vae_full_steps": 1000, "vae_full_batch": 8, "vae_full_lr": 2e-3,
                  "vae_l1": 0.0},
}


def config_for_preset(preset: str, **values) -> PretrainConfig:
    """A PretrainConfig for `preset`: its recipe (PRESET_RECIPES), then `values` over it."""
    return PretrainConfig(preset=preset, **{**PRESET_RECIPES.get(preset, {}), **values})


@dataclass
class Pretrained:
    """What `main` returns: the config that describes the weights, and the trained parts."""

    cfg: ModelConfig
    vae: VAE
    t5: T5Encoder
    dit: DiT  # the EMA weights
    tokenizer_path: Path
    metrics: dict


# ------------------------------------------------------------------------------------ 2. tokenizer


def all_captions(two_objects: bool = True) -> list[str]:
    """Every caption the vocabulary can form (one object; pairs with distinct colours when asked)."""
    objs = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    out = [caption_of(bg, [o]) for bg in BACKGROUNDS for o in objs]
    if two_objects:
        rng = np.random.default_rng(0)  # a sample of pairs is enough to cover every word and join
        for _ in range(2000):
            a, b = (objs[i] for i in rng.integers(0, len(objs), 2))
            if a[0] != b[0]:
                out.append(caption_of(str(rng.choice(list(BACKGROUNDS))), [a, b]))
    return out


def build_tokenizer(cfg: PretrainConfig, log: Log) -> Path:
    path = Path(cfg.work_dir) / "tokenizer.model"
    if not path.is_file():
        # Each word also as a sentence of its own, repeated: on the captions alone (a few dozen words in
        # fixed patterns) the unigram trainer kept ~50 mostly single-letter pieces, 58 tokens a caption.
        captions = all_captions()
        words = sorted({w for c in captions for w in c.split()})
        train_tokenizer(captions + words * 50, path, vocab_size=cfg.tokenizer_vocab)
        log("tokenizer", pieces=Tokenizer(path).sp_size)
    return path


def caption_length(tokenizer: Tokenizer, cap: int) -> int:
    """Token length covering every caption of the vocabulary (EOS included), at most `cap`."""
    longest = max(len(tokenizer.tokenize(c)) + 1 for c in all_captions())
    if longest > cap:
        raise ValueError(f"toy captions need {longest} tokens but the T5 takes {cap}; "
                         "raise T5Config.max_length")
    return longest


# ----------------------------------------------------------------------------------------------- main


def model_config(cfg: PretrainConfig) -> ModelConfig:
    """The preset with this run's architecture options applied (latent statistics come later)."""
    mc = get_preset(cfg.preset)
    if cfg.head_hidden is not None:
        mc = dataclasses.replace(mc, dit=dataclasses.replace(mc.dit, head_hidden=cfg.head_hidden))
    return mc


def main(cfg: PretrainConfig) -> Pretrained:
    # -- setup: threads, folder, log, the config the weights will carry
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormals in a converging VAE made CPU steps 10x slower
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work)
    log("setup", config=json.dumps(asdict(cfg)))
    mc = model_config(cfg)
    wall = time.time()

    # -- 1. VAE, then its latent statistics (they become config data)
    vae = train_vae(cfg, mc, log).eval()
    stats_path = work / "latent_stats.json"
    if not stats_path.is_file():
        mean, std = latent_stats(cfg, vae)
        stats_path.write_text(json.dumps({"mean": mean, "std": std}))
    stats = json.loads(stats_path.read_text())
    mc = dataclasses.replace(mc, vae=dataclasses.replace(mc.vae, latents_mean=tuple(stats["mean"]),
                                                         latents_std=tuple(stats["std"])))
    vae_state = vae.state_dict()
    vae = VAE(mc.vae).eval()
    vae.load_state_dict(vae_state, strict=True)

    # -- 2. tokenizer (sentencepiece on the captions); the T5 is built with the DiT below
    tok_path = build_tokenizer(cfg, log)
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > mc.t5.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but T5Config.vocab_size is "
                         f"{mc.t5.vocab_size}; lower tokenizer_vocab")
    length = caption_length(tokenizer, mc.t5.max_length)

    # -- 3. latent bank: training clips encoded once
    bank = build_bank(cfg, vae, tokenizer, length, log)

    # -- 4. DiT (+ text encoder)
    dit, t5, metrics = train_dit(cfg, mc, bank, log)

    # -- 5. the head's MLP, if the preset has one
    dit = train_head(cfg, dit, t5, bank, log)

    # -- 6. layout: more training where only the caption can place the objects
    dit, t5, layout_metrics = train_layout(cfg, dit, t5, bank, log)
    mc = dataclasses.replace(mc, t5=t5.cfg)  # the layout stage adds the T5's absolute position
    metrics = {**metrics, **{f"layout_{k}": v for k, v in layout_metrics.items()},
               "wall_seconds_this_run": round(time.time() - wall, 1)}
    log("done", **metrics)
    return Pretrained(mc, vae, t5, dit, tok_path, metrics)


def resume_step(work_dir: str | Path) -> tuple[int, int] | None:
    """(stage, step) of the newest checkpoint in work_dir, or None."""
    path = latest_checkpoint(work_dir)
    if path is None:
        return None
    ck = load_checkpoint(path)
    return ck.stage, ck.step


__all__ = ["PretrainConfig", "PRESET_RECIPES", "config_for_preset", "Pretrained", "main", "model_config",
           "resume_step", "all_captions", "build_tokenizer", "caption_length"]
