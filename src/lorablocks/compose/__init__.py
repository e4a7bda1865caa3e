"""Composition: the typed recipe and the one function that turns it into a delta (:mod:`.recipe`), the
methods (:mod:`.methods`, one file each) and the file-level operations behind the verbs (:mod:`.operations`)."""

from lorablocks.compose.recipe import Block, Composition, Recipe, compose, make_recipe

__all__ = ["Block", "Composition", "Recipe", "compose", "make_recipe"]
