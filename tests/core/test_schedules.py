"""The chunked and batched schedules of kron_mixture_apply: equal values and gradients, the
backend policy, and forward-mode AD (batched only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moka_jax.core import kron, schedules as kron_schedule
from moka_jax.adapters import MoKAConfig

RTOL = 1e-5  # f32, relative to the reference's max |value|
M, N = 60, 64
# Both contraction orders, groups sharing an input or an output split, a stacked group of two
# (components 3 and 4), and a padded / truncated shape: every merged-matmul path of the chunked
# schedule runs.
SHAPES = [((4, 8), (16, 8)), ((8, 8), (8, 8)), ((2, 8), (32, 8)), ((16, 4), (4, 16)),
          ((16, 4), (4, 16)), ((8, 4), (8, 16)), ((4, 16), (16, 4)), ((5, 9), (13, 8))]
GROUPS = [[0], [1], [2], [3, 4], [5], [6], [7]]
# A flat token axis longer than a chunk (lax.map / scan), rows of a batch taking runs of the
# last axis (fori_loop), one token (one chunk).
LEADS = [(2 * kron_schedule.TOKEN_CHUNK + 7,), (3, 40), ()]


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


def _factors(seed=4):
    rng = np.random.default_rng(seed)
    a = [jnp.asarray(rng.standard_normal(s[0]), jnp.float32) for s in SHAPES]
    b = [jnp.asarray(rng.standard_normal(s[1]), jnp.float32) for s in SHAPES]
    return a, b, jnp.asarray(rng.random(len(SHAPES)), jnp.float32)


def _grouped(a, b, w):
    groups = [(jnp.stack([a[i] for i in ids]), jnp.stack([b[i] for i in ids])) for ids in GROUPS]
    return groups, [w[jnp.asarray(ids)] for ids in GROUPS]


def _loss(schedule, cot):
    def loss(x, a, b, w):
        if schedule == "materialised":
            dw = sum(w[i] * jnp.kron(a[i], b[i])[:M, :N] for i in range(len(SHAPES)))
            return jnp.vdot(x @ dw.T, cot)
        y = kron.kron_mixture_apply(x, *_grouped(a, b, w), M, N, schedule=schedule)
        return jnp.vdot(y, cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def test_plan_covers_every_shared_matmul_path():
    plan = kron_schedule.make_plan([((len(ids),) + SHAPES[ids[0]][0], (len(ids),) + SHAPES[ids[0]][1])
                                    for ids in GROUPS])
    assert len(plan.x_sides) < len(GROUPS) and len(plan.y_sides) < len(GROUPS)
    assert set(plan.a_first) == {True, False}


@pytest.mark.parametrize("lead", LEADS)
def test_schedules_equal_forward_and_backward(lead):
    a, b, w = _factors()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal(lead + (N,)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(lead + (M,)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want_y, want_g = _loss("materialised", cot)(x, a, b, w)
        for schedule in ("chunked", "batched"):
            y, g = _loss(schedule, cot)(x, a, b, w)
            close(y, want_y)
            for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
                close(u, v)


def test_schedules_agree_in_bf16():
    # They round at the same points (mid operands, the output), so they differ by at most
    # the f32 order of the group sum: one bf16 rounding step of the output.
    a, b, w = _factors()
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 40, N)), jnp.bfloat16)
    apply = jax.jit(lambda x, a, b, w, s: kron.kron_mixture_apply(x, *_grouped(a, b, w), M, N,
                                                                   schedule=s), static_argnums=4)
    y = {s: np.asarray(apply(x, a, b, w, s), np.float64) for s in ("chunked", "batched")}
    close(y["chunked"], y["batched"], rtol=2.0 ** -8)


def test_policy_picks_by_backend_and_yields_to_an_override():
    assert kron.resolve_schedule("auto", "cpu") == "chunked"
    assert kron.resolve_schedule("auto", "gpu") == "batched"
    assert kron.resolve_schedule("auto", "tpu") == "batched"
    assert kron.resolve_schedule("batched", "cpu") == "batched"
    assert kron.resolve_schedule("chunked", "gpu") == "chunked"
    assert kron.resolve_schedule() == ("chunked" if jax.default_backend() == "cpu" else "batched")
    with pytest.raises(ValueError, match=r"schedule = 'fast', expected one of \['auto', "):
        kron.resolve_schedule("fast")
    with pytest.raises(ValueError, match="schedule = 'fast'"):
        MoKAConfig(schedule="fast")


def test_chunked_schedule_does_not_keep_x_sized_intermediates():
    # The reason the chunked schedule has a custom_vjp: its residuals are x and the factors.
    a, b, w = _factors()
    x = jnp.ones((2 * kron_schedule.TOKEN_CHUNK + 7, N), jnp.float32)
    f = lambda x, a: kron.kron_mixture_apply(x, *_grouped(a, b, w), M, N, schedule="chunked")
    residuals = jax.vjp(f, x, a)[1]
    sizes = sorted(int(np.prod(v.shape)) for v in jax.tree.leaves(residuals))
    assert max(sizes) == x.size


def test_forward_mode_ad_runs_on_the_batched_schedule_only():
    a, b, w = _factors()
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((5, N)), jnp.float32)
    dx = jnp.asarray(rng.standard_normal((5, N)), jnp.float32)

    def apply(schedule):
        return lambda x, a: kron.kron_mixture_apply(x, *_grouped(a, b, w), M, N, schedule=schedule)

    def materialised(x, a):
        return x @ sum(w[i] * jnp.kron(a[i], b[i])[:M, :N] for i in range(len(SHAPES))).T

    def hessian(f):  # jacfwd(jacrev): forward over reverse, wrt one small factor
        return jax.jit(jax.hessian(lambda a0: jnp.sum(f(x, [a0] + a[1:]) ** 2)))(a[0])

    with jax.default_matmul_precision("highest"):
        jvp = jax.jit(lambda f, x, a: jax.jvp(f, (x, a), (dx, a))[1], static_argnums=0)
        close(jvp(apply("batched"), x, a), jvp(materialised, x, a))
        close(hessian(apply("batched")), hessian(materialised))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(apply("chunked"), (x, a), (dx, a))
