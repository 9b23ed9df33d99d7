"""A base's recipe (train/recipe.py): one source, resolution with provenance."""

from __future__ import annotations

import dataclasses

from toyworld.experiment import ToyBudget
from toyworld.prompts import toy_prior_prompts
from train.config import ConceptSpec, PersonalizeConfig
from train.recipe import RECIPES, recipe, resolve


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
