"""Kronecker factor shapes: validation and the deterministic shape planners.

A MoKA component is ((ma, na), (mb, nb)) with ma*mb >= m and na*nb >= n. Its parameter
count ma*na + mb*nb is smallest when ma*na is near sqrt(m*n); many aspect ratios reach that
minimum, which is what makes "diverse filters" cheap. A MoKAs component is a prime block
width p; its factor C is (ceil(m / k), p) with k = ceil(n / p).
"""

from __future__ import annotations

import functools
import math

from moka_jax.support.domains import COUNT, check

KronShape = tuple[tuple[int, int], tuple[int, int]]

# Padding above this fraction of a dim is wasted compute; dims that do not factor
# (11008 = 2^8 * 43) still have near-exact splits well inside it.
MAX_PAD_FRACTION = 0.05
# Aspect ratios beyond 16:1 give kron products of very low rank for their cost.
MAX_LOG2_ASPECT = 4.0
# Plausibility of explicit shapes. A padded dim of PAD_LIMIT x the layer's or more is refused:
# fixing either factor (at most the dim) and taking the other as the ceiling always lands below
# 2x (ma * ceil(m / ma) < m + ma <= 2m), so reaching 2x means a factor larger than the cover
# needs, whose extra rows / columns are zeros computed on every token (and, for merge, a
# materialised product that large). [[512,512],[512,512]] on a 64x64 layer pads to 262144^2.
PAD_LIMIT = 2


def _layer(layer: str) -> str:
    return f"layer '{layer}'" if layer else "adapter"


def _check_dims(fn: str, m, n, r=None, budget=None) -> None:
    """The planners' arguments, through the one domain checker (clear TypeError / ValueError)."""
    check(f"{fn}: m (out features)", m, int, COUNT)
    check(f"{fn}: n (in features)", n, int, COUNT)
    if r is not None:
        check(f"{fn}: r", r, int, COUNT)
    check(f"{fn}: budget", budget, int | None, COUNT)


def moka_params(shape: KronShape) -> int:
    """Parameters of one component's two factors (the gate adds one per component)."""
    (ma, na), (mb, nb) = shape
    return ma * na + mb * nb


def validate_kron_shapes(shapes, m: int, n: int, layer: str = "") -> list[KronShape]:
    """Normalise explicit shapes to tuples and check each covers (m, n)."""
    _check_dims("validate_kron_shapes", m, n)
    if not isinstance(shapes, list | tuple):
        raise TypeError(f"{_layer(layer)}: shapes = {shapes!r}, expected a list of "
                        "((ma, na), (mb, nb)) pairs")
    if len(shapes) < 1:
        raise ValueError(f"{_layer(layer)}: MoKA needs r >= 1 components, got 0 shapes")
    out = []
    for i, shape in enumerate(shapes):
        try:
            (ma, na), (mb, nb) = shape
            ma, na, mb, nb = int(ma), int(na), int(mb), int(nb)
        except (TypeError, ValueError):
            raise ValueError(
                f"{_layer(layer)}: component {i} shape {shape!r} is not ((ma, na), (mb, nb))"
            ) from None
        if min(ma, na, mb, nb) < 1:
            raise ValueError(f"{_layer(layer)}: component {i} shape {shape!r} has a dim < 1")
        if ma * mb < m or na * nb < n:
            raise ValueError(
                f"{_layer(layer)}: component {i} A={ma}x{na}, B={mb}x{nb} covers "
                f"{ma * mb}x{na * nb} but the weight is {m}x{n} (out x in); the rule is "
                f"ma*mb >= {m} and na*nb >= {n}"
            )
        if ma * mb >= PAD_LIMIT * m or na * nb >= PAD_LIMIT * n:
            raise ValueError(
                f"{_layer(layer)}: component {i} A={ma}x{na}, B={mb}x{nb} pads the {m}x{n} "
                f"weight (out x in) to {ma * mb}x{na * nb}, {PAD_LIMIT}x or more of a dim; the "
                f"rule is ma*mb < {PAD_LIMIT * m} and na*nb < {PAD_LIMIT * n} (pick one factor "
                f"and take the other as the ceiling, e.g. mb = ceil({m} / ma)), so no compute "
                f"goes to rows or columns of zeros")
        out.append(((ma, na), (mb, nb)))
    return out


def check_adapter_params(kind: str, params: int, m: int, n: int, layer: str = "",
                         fix: str = "") -> int:
    """Refuse an adapter with more trainable parameters than the (m, n) layer it adapts.

    A dense dW of the layer has m * n parameters and can express any update; an adapter with
    more is a costlier way to reach at most that (LoRA past rank m*n / (m + n), MoKA factors
    larger than the layer), so it is a mistake in its shapes, rank or r, not a choice.
    """
    if params > m * n:
        raise ValueError(
            f"{_layer(layer)}: the {kind} adapter has {params:,} trainable parameters, more "
            f"than the {m}x{n} layer's own {m * n:,} (out x in); an adapter is refused above "
            f"the layer's parameter count, where a dense update would be cheaper"
            + (f"; {fix}" if fix else ""))
    return params


def shapes_table(shapes):
    """Explicit shapes as given (one list for every layer), or a per-weight-dims table
    {"MxN": list} (out x in; layers of different dims, e.g. q_proj and a GQA v_proj) as a
    sorted tuple of ("MxN", list) pairs: hashable, and unchanged by a JSON round trip."""
    if not isinstance(shapes, dict):
        return shapes
    for key in shapes:
        if not (isinstance(key, str) and len(key.split("x")) == 2
                and all(p.isdigit() for p in key.split("x"))):
            raise ValueError(f"shapes: key {key!r} is not a weight's dims 'MxN' (out x in), "
                             "e.g. '576x576'")
    tup = lambda v: tuple(tup(e) for e in v) if isinstance(v, list | tuple) else v
    return tuple(sorted((k, tup(v)) for k, v in shapes.items()))


def _is_table(shapes) -> bool:
    return (isinstance(shapes, tuple) and len(shapes) > 0
            and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in shapes))


def explicit_kron_shapes(shapes, m: int, n: int, layer: str = "") -> list[KronShape]:
    """A config's explicit shapes for an (m, n) layer: the one list, or its dims' entry of a
    shapes_table; checked by validate_kron_shapes."""
    shapes = shapes_table(shapes)
    if _is_table(shapes):
        table = dict(shapes)
        if f"{m}x{n}" not in table:
            raise ValueError(f"{_layer(layer)}: the per-shape table has no entry for its "
                             f"{m}x{n} weight (entries: {sorted(table)}); add '{m}x{n}'")
        shapes = table[f"{m}x{n}"]
    return validate_kron_shapes(shapes, m, n, layer)


def splits(d: int, max_pad: float = MAX_PAD_FRACTION) -> list[tuple[int, int]]:
    """All (a, b) with a*b >= d, b = ceil(d / a), padding a*b - d <= max_pad * d."""
    out = []
    for a in range(1, d + 1):
        b = -(-d // a)
        if a * b - d <= max_pad * d:
            out.append((a, b))
    return out


def _aspect(shape: KronShape) -> tuple[float, float]:
    (ma, na), (mb, nb) = shape
    return math.log2(ma / na), math.log2(mb / nb)


def _candidates(m: int, n: int) -> list[KronShape]:
    cands = []
    for ma, mb in splits(m):
        for na, nb in splits(n):
            shape = ((ma, na), (mb, nb))
            # One scalar factor would make the other a full dense dW: not a Kronecker adapter.
            if ma * na == 1 or mb * nb == 1:
                continue
            cands.append(shape)
    return cands


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft.tuners.lokr.layer.factorization (peft 0.21.2), rewritten so nothing needs peft.

    A factor dividing the dimension is used as is; otherwise the split climbs the divisors
    while the smaller part stays <= factor (-1: no cap), and is returned smaller part first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        if new_m + dimension // new_m > 1 + dimension or new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return (n, m) if m > n else (m, n)


def lokr_shape(m: int, n: int, factor: int) -> KronShape:
    """The (w1, w2) shapes PEFT LoKr builds for an (m, n) = (out, in) weight."""
    (ma, mb), (na, nb) = lokr_factorization(m, factor), lokr_factorization(n, factor)
    return ((ma, na), (mb, nb))


@functools.lru_cache(maxsize=64)
def lokr_factors_by_shape(m: int, n: int) -> dict[KronShape, tuple[int, ...]]:
    """Every shape PEFT LoKr can build for an (m, n) weight -> the decompose_factors that do.

    These are exactly the MoKA components a PEFT LoKr adapter expresses (always exact splits).
    """
    out: dict[KronShape, list[int]] = {}
    for f in (-1, *range(1, max(m, n) + 1)):
        out.setdefault(lokr_shape(m, n, f), []).append(f)
    return {s: tuple(fs) for s, fs in out.items()}


def min_moka_params(m: int, n: int) -> int:
    """Parameters of the cheapest valid component for an (m, n) weight."""
    return min(moka_params(s) for s in _candidates(m, n))


def plan_moka_shapes(m: int, n: int, r: int, budget: int | None = None, layer: str = "",
                     exact: bool = False):
    """r diverse, valid component shapes for an (m, n) weight with total params <= budget.

    exact=True keeps to exact factorisations that PEFT LoKr builds itself (ma*mb == m,
    na*nb == n, from one decompose_factor), so every component exports as a PEFT LoKr adapter
    (moka_jax.io.peft_io); the cheapest shape and the 25% allowance are then taken among those.

    budget=None allows each component 25% above the cheapest shape. Exact splits (no padding)
    are preferred when any fit; aspect ratios beyond 16:1 only when nothing else does.
    Shapes are chosen by farthest-point sampling over the two factors' log aspect ratios,
    starting from the most balanced cheap shape; ties break on (params, padding, shape), so the plan is deterministic.
    When fewer distinct shapes fit than r, the chosen list repeats (equal shapes are grouped
    into one batched contraction at run time, and shapes that split the input or the output
    alike share a matmul: kron.kron_mixture_apply). The planner does not trade diversity for
    that sharing: on a 4096->1024 layer, r=10, planning 5 shapes x 2 or putting all shapes on
    one input split made the apply at most 10% faster (bench/adapter_ops.py, 2048 tokens).
    """
    _check_dims("plan_moka_shapes", m, n, r, budget)
    cands = _candidates(m, n)
    if exact:
        cands = [s for s in lokr_factors_by_shape(m, n) if s[0][0] * s[0][1] > 1
                 and s[1][0] * s[1][1] > 1]
        if not cands:
            raise ValueError(f"{_layer(layer)}: a {m}x{n} weight has no exact Kronecker "
                             "factorisation with two non-scalar factors; use exact=False")
    cheapest = min(moka_params(s) for s in cands)
    cap = int(cheapest * 1.25) if budget is None else budget // r
    fits = [s for s in cands if moka_params(s) <= cap]
    if not fits:
        raise ValueError(
            f"{_layer(layer)}: parameter budget {budget} is too small for r={r} components on "
            f"a {m}x{n} weight; the cheapest valid shape costs {cheapest} parameters, so the "
            f"budget must be >= r * {cheapest} = {r * cheapest}"
        )
    # Padding wastes compute, so padded shapes are used only for dims with no exact split.
    # A factor with a unit dim caps the product's rank at the other factor's: avoid it too.
    fits = [s for s in fits if min(s[0] + s[1]) >= 2] or fits
    exact = [s for s in fits if s[0][0] * s[1][0] == m and s[0][1] * s[1][1] == n]
    pool = exact or fits
    pool = [s for s in pool if max(map(abs, _aspect(s))) <= MAX_LOG2_ASPECT] or pool

    def cost(s):
        (ma, na), (mb, nb) = s
        return (moka_params(s), ma * mb * na * nb - m * n, s)

    first = min(pool, key=lambda s: (sum(map(abs, _aspect(s))),) + cost(s))
    chosen = [first]
    rest = [s for s in pool if s != first]
    while len(chosen) < r and rest:
        def spread(s):
            ax, bx = _aspect(s)
            return min(abs(ax - cx) + abs(bx - cy) for cx, cy in map(_aspect, chosen))

        nxt = min(rest, key=lambda s: (-spread(s),) + cost(s))
        chosen.append(nxt)
        rest.remove(nxt)
    return [chosen[i % len(chosen)] for i in range(r)]


def is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, math.isqrt(p) + 1))


def mokas_block(m: int, n: int, p: int) -> tuple[int, int, int]:
    """(k, q, p): k = ceil(n / p) diagonal blocks of a (q, p) factor, q = ceil(m / k)."""
    k = -(-n // p)
    return k, -(-m // k), p


def mokas_params(m: int, n: int, p: int) -> int:
    _, q, _ = mokas_block(m, n, p)
    return q * p


def validate_primes(primes, m: int, n: int, layer: str = "") -> list[int]:
    _check_dims("validate_primes", m, n)
    if not isinstance(primes, list | tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in primes):
        raise TypeError(f"{_layer(layer)}: primes = {primes!r}, expected a list of ints")
    primes = [int(p) for p in primes]
    if len(primes) < 1:
        raise ValueError(f"{_layer(layer)}: MoKAs needs r >= 1 block sizes, got none")
    for p in primes:
        if not is_prime(p):
            raise ValueError(
                f"{_layer(layer)}: MoKAs block size {p} is not prime; block sizes must be "
                f"distinct primes so block boundaries of different components do not line up"
            )
        if p > n:
            raise ValueError(f"{_layer(layer)}: MoKAs block size {p} exceeds the input dim {n}")
    if len(set(primes)) != len(primes):
        raise ValueError(f"{_layer(layer)}: MoKAs block sizes {primes} must be distinct primes")
    return primes


def plan_mokas_primes(m: int, n: int, r: int, budget: int | None = None, layer: str = ""):
    """r distinct primes, the largest whose components fit budget // r parameters each.

    budget=None uses the cheapest MoKA component budget, r * 2 * sqrt(m * n) rounded, so a
    default MoKAs layer costs about what a default MoKA layer of the same r does.
    """
    _check_dims("plan_mokas_primes", m, n, r, budget)
    cap = (2 * math.isqrt(m * n)) if budget is None else budget // r
    primes = [p for p in range(2, n + 1) if is_prime(p) and mokas_params(m, n, p) <= cap]
    if len(primes) < r:
        need = sorted(mokas_params(m, n, p) for p in range(2, n + 1) if is_prime(p))[:r]
        raise ValueError(
            f"{_layer(layer)}: parameter budget {budget} is too small for r={r} MoKAs "
            f"components on a {m}x{n} weight; the {r} cheapest distinct primes need "
            f"{sum(need) if len(need) == r else 'more than'} parameters in total"
        )
    return sorted(primes[-r:])
