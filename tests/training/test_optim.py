"""The optimizer: gate lr multiplier (1.0 = the plain clip + AdamW chain, exactly; k scales the
gates' updates alone) and the gate entropy the trainer logs."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moka_jax import nn
from moka_jax.adapters import LoRAConfig, MoKAConfig, MoKAsConfig
from moka_jax.config import ConfigError, TrainConfig, config_from_dict
from moka_jax.training.optim import gate_entropy, gate_mask, lr_schedule, make_optimizer
from moka_jax.training.step import split_model
from tests.eval import tiny_model
from tests.training.test_train import tiny

CFG = TrainConfig(steps=10, lr=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip=0.5)


def adapter_params(adapter):
    m = tiny_model()
    nn.attach_adapters(m, adapter, r"(q_proj|v_proj)$", rngs=nnx.Rngs(0))
    return split_model(m)[1]


def run(tx, params, steps=4):
    """Updates of `steps` AdamW steps on fixed pseudo-random gradients."""
    state = tx.init(params)
    leaves, treedef = jax.tree.flatten(params)
    update = jax.jit(tx.update)
    out = []
    for s in range(steps):
        rng = np.random.default_rng(s)
        grads = treedef.unflatten([rng.normal(size=x.shape).astype(np.float32) for x in leaves])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state


def flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_multiplier_one_is_todays_optimizer_exactly():
    params = adapter_params(MoKAConfig(r=3))
    reference = optax.chain(optax.clip_by_global_norm(CFG.grad_clip),
                            optax.adamw(lr_schedule(CFG), b1=CFG.b1, b2=CFG.b2, eps=CFG.eps,
                                        weight_decay=CFG.weight_decay))
    got, got_state = run(make_optimizer(CFG), params)
    want, want_state = run(reference, params)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    for g, w in zip(got, want):
        for a, b in zip(flat(g), flat(w)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("adapter", [MoKAConfig(r=3), MoKAsConfig(r=2)])
def test_multiplier_scales_the_gate_updates_only(adapter):
    params = adapter_params(adapter)
    mask = flat(gate_mask(params))
    assert sum(bool(m) for m in mask) == 4  # one gate per adapted layer (2 layers x q, v)
    # Without weight decay an AdamW update depends on the gradients alone, so over several
    # steps the gates' updates are exactly 10x and every other leaf's identical.
    cfg = TrainConfig(**{**CFG.__dict__, "weight_decay": 0.0})
    base, _ = run(make_optimizer(cfg), params)
    scaled, _ = run(make_optimizer(TrainConfig(**{**cfg.__dict__, "gate_lr_mult": 10.0})), params)
    for b, s in zip(base[1:], scaled[1:]):  # step 0 is at lr 0 (warm-up)
        for is_gate, x, y in zip(mask, flat(b), flat(s)):
            if is_gate:
                assert np.abs(x).max() > 0
                np.testing.assert_allclose(y, 10.0 * x, rtol=1e-6)
            else:
                np.testing.assert_array_equal(y, x)


def test_gate_mask_and_entropy_without_gates():
    for adapter in (LoRAConfig(r=2), MoKAConfig(r=3, gated=False)):
        params = adapter_params(adapter)
        assert not any(bool(m) for m in flat(gate_mask(params)))
        assert gate_entropy(params) is None


def test_gate_entropy_against_numpy():
    params = adapter_params(MoKAConfig(r=3))
    assert gate_entropy(params) == pytest.approx(1.0, abs=1e-12)  # g = 0: uniform
    logits = [np.array([2.0, 0.0, -1.0]), np.array([0.0, 0.0, 5.0]),
              np.array([1.0, 1.0, 1.0]), np.array([-3.0, 0.5, 0.0])]
    mask, leaves = flat(gate_mask(params)), jax.tree.leaves(params)
    it = iter(logits)
    leaves = [next(it).astype(np.float32) if m else x for m, x in zip(mask, leaves)]
    params = jax.tree.unflatten(jax.tree.structure(params), leaves)
    want = np.mean([-(p * np.log(p)).sum() / np.log(3)
                    for p in (np.exp(g) / np.exp(g).sum() for g in logits)])
    assert gate_entropy(params) == pytest.approx(want, rel=1e-6)


def test_gate_lr_mult_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.gate_lr_mult = 0.0, expected > 0"):
        config_from_dict(tiny("/tmp/x", train__gate_lr_mult=0.0))


def test_trainer_logs_gate_entropy(tmp_path):
    """Every log record of a gated MoKA run carries the entropy; the last one is the final
    gates' (gates.json), computed here with numpy."""
    from moka_jax.training.run import train

    cfg = config_from_dict(tiny(tmp_path / "run", train__steps=6, train__log_every=2,
                                train__save_every=0, train__gate_lr_mult=100.0))
    train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    ent = [r["gate_entropy"] for r in records if "loss" in r]
    assert len(ent) == 3 and all(0.0 < e <= 1.0 for e in ent)
    assert ent[-1] < 1.0 - 1e-6  # the gates moved at this lr
    gates = json.loads((tmp_path / "run" / "gates.json").read_text())
    want = np.mean([-(np.asarray(a) * np.log(a)).sum() / np.log(len(a)) for a in gates.values()])
    assert ent[-1] == pytest.approx(want, rel=1e-5)


def test_fingerprint_keeps_older_checkpoints_resumable():
    """At 1.0 the new key trains as before, so it stays out of the run fingerprint (runs
    checkpointed before it existed resume); any other value is part of the run's identity."""
    from moka_jax.training.plan import fingerprint

    assert "gate_lr_mult" not in fingerprint(config_from_dict(tiny("/tmp/x")))["train"]
    fp = fingerprint(config_from_dict(tiny("/tmp/x", train__gate_lr_mult=10.0)))
    assert fp["train"]["gate_lr_mult"] == 10.0
