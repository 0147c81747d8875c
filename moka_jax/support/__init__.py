"""The ground floor, importing nothing of moka_jax: checked reads (files), safe writes
(outputs), option domains (domains), flat pytree paths (trees), the machine (machine), item
bootstrap intervals (bootstrap), host buffers a device aliases without a copy (hostmem)."""
