"""Training: plan (every check before weights load) above loop; step, optim, sharding,
checkpoint, metrics below it; run.train composes plan and loop (moka_jax.train).

The package is `training`, not `train`: a subpackage `moka_jax.train` would replace the public
function `moka_jax.train` as an attribute of the package once anything imported it.
"""
