"""The shape planners: always valid, within budget, deterministic; explicit shapes validated."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moka_jax.core import shapes


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 700), st.integers(8, 700), st.integers(1, 10), st.floats(1.0, 3.0))
def test_planner_valid_and_within_budget(m, n, r, slack):
    budget = int(r * shapes.min_moka_params(m, n) * slack)
    plan = shapes.plan_moka_shapes(m, n, r, budget)
    assert len(plan) == r
    assert shapes.validate_kron_shapes(plan, m, n) == plan
    assert sum(shapes.moka_params(s) for s in plan) <= budget
    assert plan == shapes.plan_moka_shapes(m, n, r, budget)  # deterministic


def test_planner_is_diverse_on_llama_shapes():
    for m, n in [(4096, 4096), (1024, 4096), (11008, 4096), (14336, 4096), (192, 576)]:
        plan = shapes.plan_moka_shapes(m, n, 5)
        assert len(set(plan)) == 5, (m, n, plan)
        for (ma, na), (mb, nb) in plan:  # dims that factor exactly get no padding
            assert ma * mb == m and na * nb == n


def test_planner_pads_prime_dims():
    plan = shapes.plan_moka_shapes(97, 101, 3)
    for (ma, na), (mb, nb) in plan:
        assert min(ma, na, mb, nb) >= 2 and ma * mb >= 97 and na * nb >= 101


def test_paper_budget_on_llama2_7b_attention():
    plan = shapes.plan_moka_shapes(4096, 4096, 10, 81920)
    assert sum(shapes.moka_params(s) for s in plan) == 81920


def test_budget_too_small_and_bad_r():
    with pytest.raises(ValueError, match=r"layer 'q'.*budget 100 is too small.*>= r \* 8192 = 32768"):
        shapes.plan_moka_shapes(4096, 4096, 4, 100, layer="q")
    with pytest.raises(ValueError, match="r = 0, expected >= 1"):
        shapes.plan_moka_shapes(64, 64, 0)
    with pytest.raises(ValueError, match="r = 0, expected >= 1"):
        shapes.plan_mokas_primes(64, 64, 0)
    with pytest.raises(ValueError, match="too small"):
        shapes.plan_mokas_primes(64, 64, 4, budget=8)


def test_explicit_shapes_validated():
    with pytest.raises(ValueError, match=r"layer 'l3'.*covers 12x16.*ma\*mb >= 13"):
        shapes.validate_kron_shapes([((3, 4), (4, 4))], 13, 16, "l3")
    with pytest.raises(ValueError, match="not \\(\\(ma, na\\), \\(mb, nb\\)\\)"):
        shapes.validate_kron_shapes([(3, 4)], 12, 16)


def test_mokas_primes():
    primes = shapes.plan_mokas_primes(4096, 4096, 4, budget=4 * 4096)
    assert len(set(primes)) == 4 and all(shapes.is_prime(p) for p in primes)
    assert sum(shapes.mokas_params(4096, 4096, p) for p in primes) <= 4 * 4096
    with pytest.raises(ValueError, match="block size 9 is not prime"):
        shapes.validate_primes([7, 9], 64, 64, "v")
    with pytest.raises(ValueError, match="distinct"):
        shapes.validate_primes([7, 7], 64, 64)
    k, q, p = shapes.mokas_block(100, 90, 7)
    assert (k, q, p) == (13, 8, 7) and k * p >= 90 and k * q >= 100


# ---- the exact (PEFT LoKr) planner ---------------------------------------------------------


def test_lokr_factorization_is_peft_s():
    peft_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for d in (1, 12, 64, 97, 192, 576, 4096, 11008):
        for f in (-1, 1, 2, 3, 5, 8, 9, 16, 24, 100):
            assert shapes.lokr_factorization(d, f) == peft_layer.factorization(d, f), (d, f)


@pytest.mark.parametrize("m, n", [(576, 576), (192, 576), (4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("r", [1, 4, 10])
def test_exact_planner_shapes_are_exact_and_peft_buildable(m, n, r):
    plan = shapes.plan_moka_shapes(m, n, r, exact=True)
    assert len(plan) == r
    by_shape = shapes.lokr_factors_by_shape(m, n)
    for s in plan:
        (ma, na), (mb, nb) = s
        assert ma * mb == m and na * nb == n
        f = by_shape[s][0]  # a decompose_factor under which PEFT builds exactly this shape
        assert shapes.lokr_shape(m, n, f) == s
    cheapest = min(shapes.moka_params(s) for s in by_shape if min(s[0][0] * s[0][1],
                                                                     s[1][0] * s[1][1]) > 1)
    assert all(shapes.moka_params(s) <= 1.25 * cheapest for s in plan)
