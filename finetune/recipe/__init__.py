"""Recipes: the keys a recipe may hold, their defaults and checks (`keys`), and reading a recipe file with `extends`
and command-line overrides (`load`)."""
