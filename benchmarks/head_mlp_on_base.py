"""The head-MLP experiment (benchmarks/results/toyworld-base-experiments.md, entry 1) on an existing
base: a pretraining work dir whose finished VAE, tokenizer, text encoder and DiT are the base's own, then
`setseq pretrain --head-hidden N` on it, which skips to training the head's MLP alone and writes a base
folder with its held-out report.

    python -m benchmarks.head_mlp_on_base --out runs/tiny-mlp     # assets/tiny + a 256-wide head MLP, ~9 min

The MLP starts from the init a run from scratch would draw (the DiT is built under the same seed), so the
result is what `setseq pretrain --head-hidden N` from scratch gives whenever its DiT steps reproduce the
base's. Compare the bases with `setseq demo --base OUT` and `setseq bench toyworld --base OUT`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.dit import DiT
from model.t5 import T5Encoder
from setseq import cli
from train.checkpoint import capture_rng, checkpoint_path, save_checkpoint
from train.pretrain import STAGE_DIT, PretrainConfig
from weights.checkpoint import load_checkpoint


def seed_work_dir(base: Path, work: Path, cfg: PretrainConfig) -> None:
    """Write the files `train.pretrain.main` finds and skips: the VAE, latent stats, tokenizer and a final
    DiT checkpoint (DiT = EMA = the base's weights, the head MLP at its seeded init)."""
    models = load_checkpoint(base)
    mc = dataclasses.replace(models.cfg, dit=dataclasses.replace(models.cfg.dit, head_hidden=cfg.head_hidden))
    torch.manual_seed(cfg.seed + 1)  # train_dit's seed: the MLP's init is drawn as a fresh run draws it
    dit, t5 = DiT(mc.dit), T5Encoder(mc.t5)
    missing, unexpected = dit.load_state_dict(models.dit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("head.mlp.") for k in missing):
        raise ValueError(f"{base}'s DiT does not match (missing {missing}, unexpected {unexpected})")
    t5.load_state_dict(models.t5.state_dict(), strict=True)
    trained = [p for n, p in dit.named_parameters() if not n.startswith("head.mlp.")] + list(t5.parameters())
    opt = torch.optim.AdamW(trained, lr=cfg.lr)  # shape only: a finished stage never steps it
    params = {f"{prefix}.{k}": v.clone() for prefix, m in (("dit", dit), ("ema", dit), ("t5", t5))
              for k, v in m.state_dict().items()}
    work.mkdir(parents=True, exist_ok=False)
    save_checkpoint(checkpoint_path(work, STAGE_DIT, cfg.dit_steps), stage=STAGE_DIT, step=cfg.dit_steps,
                    params=params, optimizer=opt, rng=capture_rng(torch.Generator()),
                    config=dataclasses.asdict(cfg))
    vae_state = {k: v.contiguous() for k, v in models.vae.state_dict().items()}
    save_file(vae_state, str(work / "vae-linear.safetensors"))
    vae = models.cfg.vae
    stats = {"mean": list(vae.latents_mean), "std": list(vae.latents_std)}
    (work / "latent_stats.json").write_text(json.dumps(stats))
    shutil.copyfile(models.tokenizer_path, work / "tokenizer.model")
    if (base / "pretrain.log").is_file():  # the base's own history stays at the top of the log
        shutil.copyfile(base / "pretrain.log", work / "pretrain.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="assets/tiny", help="a tiny base folder (linear VAE)")
    parser.add_argument("--out", required=True, help="base folder to write")
    parser.add_argument("--work-dir", help="pretraining work dir (default: OUT-work; must not exist)")
    parser.add_argument("--head-hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work_dir or f"{args.out}-work")
    cfg = PretrainConfig(work_dir=str(work), threads=args.threads, head_hidden=args.head_hidden)
    seed_work_dir(Path(args.base), work, cfg)
    raise SystemExit(cli.main(["pretrain", "--preset", cfg.preset, "--out", args.out, "--work-dir", str(work),
                               "--threads", str(args.threads), "--head-hidden", str(args.head_hidden)]))


if __name__ == "__main__":
    main()
