"""Recipes: one YAML file names a model, its data and every artifact to build and validate.

`load_recipe` parses a file into the config dataclasses the CLI commands fill (schema in
`schema.py`); `run_recipe` builds what is missing, validates it and writes one combined report.
"""

from qwen_quant.recipe.runner import Outcome, RunConfig, run_recipe
from qwen_quant.recipe.schema import ARTIFACT_TYPES, ArtifactSpec, Recipe, Source, load_recipe, parse_recipe, shrink

__all__ = ["ARTIFACT_TYPES", "ArtifactSpec", "Outcome", "Recipe", "RunConfig", "Source", "load_recipe",
           "parse_recipe", "run_recipe", "shrink"]
