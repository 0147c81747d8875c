"""Mesh (data, fsdp), placement of the batch / frozen base / adapters, and multi-host start-up.

- batch: sharded over both axes (each fsdp shard also holds distinct examples, as in FSDP);
- frozen base: every leaf with a leading dim divisible by the fsdp size is sharded on it
  (packed 4-bit codes (out, in/2), scales (out, in/block), dense kernels, embeddings);
- adapters and optimizer state: replicated (they are ~0.1% of the base).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(dist_cfg) -> None:
    """jax.distributed.initialize from the config / environment (JAX's own runtime)."""
    fields = (dist_cfg.coordinator_address, dist_cfg.num_processes, dist_cfg.process_id)
    if not dist_cfg.initialize and all(f is None for f in fields):
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=dist_cfg.coordinator_address,
                               num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id)


def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
                         f"{len(devices)} are available; set mesh.data / mesh.fsdp so the "
                         "product equals the device count (data: -1 fills it)")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def frozen_spec(shape, mesh: Mesh) -> P:
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and len(shape) >= 1 and shape[0] % fsdp == 0 and np.prod(shape) >= 4096:
        return P("fsdp")
    return P()


def place_frozen(frozen, mesh: Mesh):
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, frozen_spec(x.shape, mesh))), frozen)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def place_batch(batch: dict, mesh: Mesh, micro_batches: int | None = None) -> dict:
    """Global numpy batch (identical on every process) -> globally sharded arrays.

    micro_batches: reshape (B, T) -> (accum, B / accum, T) on the host first, sharding the
    second axis, so the step scans over micro-batches without any resharding.
    Each process fills only its addressable shards, so this works unchanged with many hosts.
    """
    spec = P(BATCH_AXES)
    if micro_batches is not None:
        batch = {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}
        spec = P(None, BATCH_AXES)
    sharding = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
