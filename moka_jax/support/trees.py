"""Pytrees as flat {'a/b/c': leaf} maps: the one key rule every saved tree uses.

    flat = flat_paths(tree)                   # {"layers/0/attn/q_proj/adapter/lora_a": array}
    tree = nest_paths(flat)                   # the nested dict orbax stores
    compare_signatures(saved, tree_signature(tree), "adapter x")   # strict restore contract

Training checkpoints, adapter files (safetensors, orbax, PEFT) and converted models all key
their arrays this way, so a tree written by one is read by the others.
"""

from __future__ import annotations

import jax
import numpy as np


class CheckpointError(ValueError):
    """A saved tree (training checkpoint or adapter file) that is damaged or does not fit the
    live one; the message names the step or file, the paths and the fix."""


def path_key(k) -> str:
    """One path entry (a dict key, attribute name or sequence index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_paths(tree) -> dict:
    """{'a/b/c': leaf} for every leaf of a pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(path_key(k) for k in path): v for path, v in flat}


def nest_paths(flat: dict) -> dict:
    """{"a/b/c": v} -> {"a": {"b": {"c": v}}}: the nested dict orbax stores."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def tree_signature(tree) -> dict[str, list]:
    """{'a/b/c': [shape..., dtype]} for every leaf: the strict-restore contract."""
    return {path: [*map(int, np.shape(v)), str(v.dtype) if hasattr(v, "dtype")
                   else str(np.asarray(v).dtype)]
            for path, v in flat_paths(tree).items()}


def compare_signatures(saved: dict, live: dict, what: str) -> None:
    """CheckpointError listing the paths missing, extra or changed between two signatures."""
    missing = sorted(set(live) - set(saved))
    extra = sorted(set(saved) - set(live))
    changed = sorted(k for k in set(saved) & set(live) if saved[k] != live[k])
    if missing or extra or changed:
        lines = [f"{what} does not match the model's adapter tree:"]
        if missing:
            lines.append(f"  not in the checkpoint ({len(missing)}): {missing[:5]}")
        if extra:
            lines.append(f"  only in the checkpoint ({len(extra)}): {extra[:5]}")
        for k in changed[:5]:
            lines.append(f"  {k}: checkpoint {saved[k]} vs model {live[k]}")
        lines.append("  The checkpoint was written with another adapter config, targets or model.")
        raise CheckpointError("\n".join(lines))


def local_numpy(tree):
    """Host copies of (replicated) global arrays; safe on any process of a multi-host run."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


__all__ = ["CheckpointError", "compare_signatures", "flat_paths", "local_numpy", "nest_paths",
           "path_key", "tree_signature"]
