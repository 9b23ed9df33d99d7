"""A base's recipe (train/recipe.py): one source, resolution with provenance."""

from __future__ import annotations

import dataclasses

from toyworld.experiment import ToyBudget
from toyworld.prompts import toy_prior_prompts
from train.config import ConceptSpec, PersonalizeConfig
from train.recipe import RECIPES, pair_room, per_concept_budget, recipe, resolve


def test_tiny_recipe_prior_prompts_are_the_toy_worlds():
    assert RECIPES["tiny"]["prior_prompts"] == toy_prior_prompts(RECIPES["tiny"]["prior_count"])


def test_toy_budget_trains_the_tiny_recipe():
    budget = dataclasses.asdict(ToyBudget())
    assert {k: budget[k] for k in RECIPES["tiny"] if k in budget} == {
        k: v for k, v in RECIPES["tiny"].items() if k in budget}


def test_tiny_stage_two_text_is_in_the_worlds_caption_order():
    spec = ConceptSpec("x.mp4", "a [v] square on a gray background", "moves [u]")
    cfg = PersonalizeConfig(concepts=[spec], out="c.safetensors", **recipe("tiny"))
    assert cfg.concepts[0].text(2) == "a [v] square moves [u] on a gray background"


def test_paper_presets_use_the_defaults():
    assert recipe("wan2.1-1.3b") == {} and recipe("paper") == {}


def test_each_setting_names_where_it_came_from():
    got = resolve({"lr": 3.0}, {"lr": 2.0, "rank": 4}, {"rank": 16, "steps1": 600},
                  {"lr": 1e-4, "rank": 32, "steps1": 600, "seed": 0})
    assert got == {"lr": (3.0, "flag"), "rank": (4, "TOML"), "steps1": (600, "base recipe"),
                   "seed": (0, "default")}


def test_step_counts_and_rank_nobody_set_are_one_concepts():
    def run(n: int, **kw) -> PersonalizeConfig:
        concepts = [ConceptSpec(f"v{i}.mp4", f"a [v{i}] square", f"moves [u{i}]", token=f"[v{i}]",
                                motion_token=f"[u{i}]") for i in range(n)]
        return PersonalizeConfig(concepts=concepts, out="c.safetensors", **kw)

    settings = {"steps1": (600, "base recipe"), "steps2": (900, "default"), "rank": (16, "default")}
    assert per_concept_budget(settings, run(1)) == settings
    assert per_concept_budget(settings, run(1, companion_prompts=("a x | a x",), stitch_prob=0.5)) == {
        **settings, "steps2": (1350, "default x 1.5 (1 concept, stitched pairs on 50% of the steps)")}
    two = per_concept_budget(settings, run(2, stitch_prob=0.25))  # the paper's share: its steps have room
    assert two["steps1"][0] == 1200 and two["steps2"][0] == 1800 and two["rank"][0] == 32
    assert per_concept_budget(settings, run(2, stitch_prob=0.5))["steps2"][0] == 2700  # pairs on top
    assert per_concept_budget({**settings, "steps2": (900, "flag")}, run(2))["steps2"] == (900, "flag")
    assert per_concept_budget({**settings, "rank": (8, "TOML")}, run(2))["rank"] == (8, "TOML")
    assert [pair_room(p) for p in (0.0, 0.25, 0.5, 1.0)] == [1.0, 1.0, 1.5, 3.0]


def test_a_toml_of_two_concepts_trains_each_the_recipes_steps(tmp_path):
    from setseq.cli import build_parser
    from setseq.cmd_personalize import build_config

    concept = ('[[concepts]]\nvideo = "v{i}.mp4"\nprompt = "a [v{i}] square"\ntoken = "[v{i}]"\n'
               'motion_token = "[u{i}]"\n')
    toml = tmp_path / "two.toml"
    toml.write_text(f'base = "tiny"\nout = "{tmp_path / "c.safetensors"}"\nsteps1 = 5\n'
                    + "".join(concept.format(i=i) for i in (1, 2)))
    cfg, _, settings = build_config(build_parser().parse_args(["personalize", "--config", str(toml)]))
    # the TOML's steps1 stays as set; stage 2: two concepts, and the recipe's pairs on half the steps on top
    assert (cfg.steps1, cfg.steps2) == (5, 2 * 1.5 * RECIPES["tiny"]["steps2"])
    assert settings["steps2"][1].startswith("base recipe x 3 (2 concepts")
    assert cfg.rank == 2 * RECIPES["tiny"]["rank"] and settings["rank"][1] == "base recipe x 2 (2 concepts)"
