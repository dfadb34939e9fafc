"""Recipes: YAML files beside ``config.py``, which parses them into dataclasses."""
