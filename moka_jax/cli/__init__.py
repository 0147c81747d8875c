"""Installed commands (pyproject [project.scripts]): moka-train, moka-eval, moka-export,
moka-generate, moka-convert, moka-lm-eval. Each is also `python -m <module>`."""
