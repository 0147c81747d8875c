"""Every command's main(): the installed moka-train, moka-eval, moka-export, moka-generate,
moka-convert, moka-lm-eval (pyproject [project.scripts]), and compare / gguf; each is also
`python -m moka_jax.cli.<name>`."""
