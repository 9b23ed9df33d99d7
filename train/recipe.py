"""Each base's recommended personalization settings, and how a run's settings are resolved.

A recipe is PersonalizeConfig field values. The paper's (Table 6) are PersonalizeConfig's own defaults,
for Wan and the paper's model; the tiny base of the toy world trains with its own, which the demo and
the bench read too (toyworld.experiment.ToyBudget). A run's settings come, each, from the first of:
a command-line flag, the TOML file, the base's recipe, the default (`resolve`).
"""

from __future__ import annotations

from lora.inject import DEFAULT_TARGETS

# The DiT's output head of the tiny base: a (dim -> out_channels x patch) linear whose 128 inputs span
# every output a token can take (128 of its 640 values). The paper's targets cannot move that span, and
# frames whose pattern lies outside it came out washed out; a LoRA on the head turns the span toward the
# concept (measured on the bench: reconstruction MSE 0.024 -> 0.015 with it). At Wan's sizes the head
# (1536 inputs, 64 outputs) is no bottleneck.
HEAD_TARGET = r"head\.head"

# The toy world's own two-part captions, "STATIC | FULL" (toyworld.experiment.toy_prior_prompts(8)).
TOY_PRIOR_PROMPTS = (
    "a magenta square on a gray background | a magenta square moves up on a gray background",
    "a yellow circle on a black background | a yellow circle moves left on a black background",
    "a red circle on a blue background | a red circle moves left on a blue background",
    "a magenta square on a green background | a magenta square orbits clockwise on a green background",
    "a white square on a brown background | a white square orbits clockwise on a brown background",
    "a cyan square on a gray background | a cyan square moves up on a gray background",
    "a white triangle on a black background | a white triangle moves right on a black background",
    "a magenta triangle on a blue background | a magenta triangle moves left on a blue background",
)

RECIPES: dict[str, dict] = {
    # The paper's lr 1e-4 is for an 11B model; the tiny base trains at 1e-3, its zero-initialized tokens
    # at 1e-3 too (at 1e-5 they barely move). At prior_weight 1 the prior halved what the concept learned.
    # 600 + 1200 steps: on the bench every column gained over 300 + 600, and 900 + 1800 added little.
    "tiny": dict(
        steps1=600, steps2=1200, rank=16, lr=1e-3, token_lr=1e-3, batch_size=8, prior_count=8,
        prior_per_batch=2, prior_weight=0.25, targets=(*DEFAULT_TARGETS, HEAD_TARGET),
        prior_prompts=TOY_PRIOR_PROMPTS,
        # Stage 1's single frames at training shift 2, the clips at the base's 5: a frame has a fifth of a
        # clip's latent values (SD3's rule: 5 / sqrt(5) = 2.2). At 5 the frames' times sat where the look is
        # already decided: the demo's worst frame of its background edit 0.37 / 0.49 -> 0.43 / 0.52, the
        # bench and composition within their spread. Shift 3 for the clips too broke composition (which
        # object goes where is decided at the noisiest times).
        frame_time_shift=2.0,
        motion_before=" on a ",  # stage 2 in the world's caption order: "a [v] square moves [u] on a ..."
        # Stitched pairs as the world lays out two objects: one 64x64 frame, the first-named concept in the
        # left half, in the world's two-object caption; side by side at 64x128 with "On the left, ..."
        # (Wan's form) the second slot never read the learned tokens (`setseq bench compose`).
        pair_layout="halves",
        # Several concepts: a stitched pair on half the steps, stage 2 then 1.5x as long (pair_room). Against
        # one step in four, on the whole compose protocol (3 pairs x 2 seeds) both halves right 0.83 / 0.83
        # -> 1.00 / 1.00, crop margin +0.44 -> +0.63, per-half motion 0.52 -> 0.68: a concept sees its motion
        # as it must move in a half. Cost: each concept generated alone moves less like itself (0.93 -> 0.87).
        stitch_prob=0.5,
    ),
}
RECIPES["tiny-conv"] = RECIPES["tiny"]  # the same toy world on the conv VAE's latents


def recipe(base_name: str) -> dict:
    """The base's recipe; {} (the paper's, PersonalizeConfig's defaults) for a base without its own."""
    return dict(RECIPES.get(base_name, {}))


Settings = dict[str, tuple[object, str]]  # name -> (value, where it came from)


def resolve(flags: dict, toml: dict, base_recipe: dict, defaults: dict) -> Settings:
    """Every setting as (value, where it came from): "flag", "TOML", "base recipe" or "default"."""
    out = {k: (v, "default") for k, v in defaults.items()}
    for source, values in (("base recipe", base_recipe), ("TOML", toml), ("flag", flags)):
        out.update({k: (v, source) for k, v in values.items()})
    return out


PAIR_ROOM = 0.25  # the share of steps the default step counts leave to stitched pairs (paper's stitch_prob)


def pair_room(stitch_prob: float) -> float:
    """How much longer stage 2 trains when stitched pairs take more than PAIR_ROOM of the steps, so that each
    concept keeps its own steps: (1 - PAIR_ROOM) / (1 - stitch_prob), 1 to 3. At the tiny recipe's 0.5 (1.5x)
    a concept generated alone kept its look; at 1x it fell below its flat-colour floor (docs/results.md)."""
    return max(1.0, (1 - PAIR_ROOM) / max(1 - stitch_prob, PAIR_ROOM))


def per_concept_budget(settings: Settings, cfg) -> Settings:
    """Step counts and the rank no flag or TOML set are one concept's: with several concepts in one run
    (cfg, a PersonalizeConfig) each stage trains that many times as long (the paper: 2k-2.5k steps for
    several concepts against 600 / 900 for one; the toy compose bench scales the same way), stage 2
    pair_room(stitch_prob) times longer again when the run draws stitched pairs, and the shared adapter
    has that many times the rank, so each concept keeps its own capacity (at one concept's rank a joint
    toy run lost a concept's look in a new scene: docs/results.md)."""
    concepts, stitch_prob = cfg.concept_count(), cfg.stitch_prob if cfg.stitches() else 0.0
    out = dict(settings)
    why = f"{concepts} concept{'s' if concepts > 1 else ''}"
    pairs = f"{why}, stitched pairs on {stitch_prob:.0%} of the steps"
    for key, scale, note in (("steps1", concepts, why), ("steps2", concepts * pair_room(stitch_prob), pairs),
                             ("rank", concepts, why)):
        value, source = out[key]
        if scale != 1 and source in ("default", "base recipe"):
            out[key] = (round(value * scale), f"{source} x {scale:g} ({note})")
    return out


def settings_lines(settings: Settings) -> list[str]:
    """What a run resolved (`resolve`), one setting a line, and where it came from."""
    return [f"  {k} = {v!r}  ({src})" for k, (v, src) in sorted(settings.items()) if k != "concepts"]


def config_unreadable_words(cfg, tokenizer) -> list[str]:
    """Tokenizer.unreadable_words of every text a run trains on: both stages of each concept and the prior."""
    texts = [c.text(s) for c in cfg.concepts for s in (1, 2)]
    texts += list(cfg.prior_prompts) if cfg.prior_count else []
    return list(dict.fromkeys(w for t in texts for w in tokenizer.unreadable_words(t)))


__all__ = ["HEAD_TARGET", "TOY_PRIOR_PROMPTS", "RECIPES", "recipe", "resolve", "pair_room",
           "per_concept_budget", "settings_lines", "config_unreadable_words"]
