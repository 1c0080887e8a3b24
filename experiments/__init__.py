"""Exploratory measurements behind the numbers in README.md and docs/ (README.md in this
folder indexes the scripts and the JSON they wrote); run from the repository root as
``python -m experiments.<name>``."""
