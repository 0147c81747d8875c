"""LLaMA-family decoder in Flax NNX: RMSNorm, RoPE (default / llama3), GQA, SwiGLU, KV cache.
Mistral, Qwen2 / Qwen2.5 and Qwen3 are the same decoder with options (models.families):
q/k/v biases, per-head q/k RMSNorm, sliding-window attention on some or all layers.

Module paths (what adapter regexes match, see `moka_jax.nn.attach_adapters`):
    embed/embedding                       FrozenWeight (V, D)
    layers/{i}/attn_norm, layers/{i}/mlp_norm, norm     RMSNorm (FrozenWeight scale)
    layers/{i}/attn/{q,k,v,o}_proj        Linear
    layers/{i}/attn/{q,k}_norm            RMSNorm over H (qk_norm models only)
    layers/{i}/mlp/{gate,up,down}_proj    Linear
    lm_head                               Linear (untied models only)

Shape letters: B batch, T query tokens, S key slots, D model, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax.models import families
from moka_jax.models.cache import KVCache, write_slots
from moka_jax.nn import Linear
from moka_jax.variables import FrozenWeight

ROPE_TYPES = ("default", "llama3")
# Checkpoints round their embedding up for matmul efficiency (phi-2: 50295 tokens in 51200 rows,
# a multiple of 1024; Qwen2: 151665 in 151936); more rows than the next multiple is a mismatch.
VOCAB_PAD_MULTIPLE = 1024


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v and o projections (LLaMA, Qwen3)
    mlp_bias: bool = False
    qkv_bias: bool = False  # q, k, v only (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    # a query sees at most this many slots (itself and sliding_window - 1 back)
    sliding_window: int | None = None
    # per layer "full_attention" | "sliding_attention"; () = none slide; every layer slides when
    # only sliding_window is given (Mistral), filled in by __post_init__
    layer_types: tuple = ()
    bos_token_id: int | None = 1
    eos_token_ids: tuple = (2,)
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if (self.rope_type == "llama3") != (self.rope_llama3 is not None):
            raise ValueError("rope_type 'llama3' needs rope_llama3 parameters (and only it takes them)")
        if self.architecture not in families.FAMILIES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: "
                             f"{families.supported()}")
        types = tuple(self.layer_types) or (
            ("sliding_attention",) * self.num_hidden_layers if self.sliding_window else ())
        if types and len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(types)} entries for "
                             f"{self.num_hidden_layers} layers")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError("sliding_attention layers need a sliding_window")
        if "sliding_attention" not in types:  # one canonical form: no window, no types
            types = ()
            object.__setattr__(self, "sliding_window", None)
        object.__setattr__(self, "layer_types", types)

    @property
    def biased_qkv(self) -> bool:
        return self.attention_bias or self.qkv_bias

    @property
    def layer_windows(self) -> tuple:
        """Per layer: the sliding window, or None for full attention."""
        return tuple(self.sliding_window if t == "sliding_attention" else None
                     for t in self.layer_types) or (None,) * self.num_hidden_layers

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4 `rope_scaling` or 5
        `rope_parameters`) of a supported family (models.families)."""
        family = families.family_of(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported ({family.architecture} "
                             "here uses 'silu')")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = None
        if rope_type == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                      float(rope["high_freq_factor"]),
                      int(rope.get("original_max_position_embeddings",
                                   d.get("max_position_embeddings", 2048))))
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id", 2)
        eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_type=rope_type, rope_llama3=llama3,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            **families.read_family_keys(family, d),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos,
            pad_token_id=d.get("pad_token_id"), architecture=family.architecture)

    @classmethod
    def from_pretrained_dir(cls, path) -> LlamaConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json in {path}")
        return cls.from_hf_dict(json.loads(file.read_text()))

    def to_hf_dict(self) -> dict:
        """A config.json dict transformers loads as the recorded architecture, with its own keys."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_llama3 is not None:
            f, lo, hi, orig = self.rope_llama3
            rope.update(factor=f, low_freq_factor=lo, high_freq_factor=hi,
                        original_max_position_embeddings=orig)
        family = families.FAMILIES[self.architecture]
        eos = list(self.eos_token_ids)
        return {
            "architectures": [self.architecture], "model_type": family.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            **families.family_hf_keys(family, self),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
        }


# ---- pure math ---------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """(H/2,) inverse frequencies in float32, as transformers computes them (incl. llama3)."""
    dim = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta)
                  ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if config.rope_llama3 is None:
        return inv
    factor, low, high, old_len = config.rope_llama3
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    # Between the two wavelengths, interpolate smoothly from scaled to unscaled.
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BT, inv_freq):
    """cos, sin (B, T, H) in float32; halves duplicated (the HF rotate_half layout)."""
    freqs_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    half = x_BTNH.shape[-1] // 2
    rot = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None].astype(x_BTNH.dtype), sin_BTH[:, :, None].astype(x_BTNH.dtype)
    return x_BTNH * cos + rot * sin


def rms_norm(x_BTD, scale_D, eps: float):
    x32 = x_BTD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x_BTD.dtype) * scale_D.astype(x_BTD.dtype)


def positions_from_mask(mask_BT, prior_B=None):
    """Position of each token = real tokens before it (pads do not count; their own value is unused)."""
    pos_BT = jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1
    if prior_B is not None:
        pos_BT = pos_BT + prior_B[:, None]
    return jnp.maximum(pos_BT, 0)


def attention_mask(key_valid_BS, q_slot_T, k_slot_S, window: int | None = None):
    """(B, T, S) bool: causal by slot and the key slot holds a real token; with a sliding
    window, also fewer than `window` slots back (transformers' kv_idx > q_idx - window). A
    row's real tokens fill consecutive slots, so slot distance is position distance."""
    back_TS = q_slot_T[:, None] - k_slot_S[None, :]
    causal_TS = back_TS >= 0
    if window is not None:
        causal_TS = causal_TS & (back_TS < window)
    return causal_TS[None] & key_valid_BS[:, None, :]


def segment_mask(segment_ids_BT, window: int | None = None):
    """(B, T, T) bool for packed rows: causal, within one example (segment id), never padding
    (id 0). A row of one example and right padding gives the same mask as attention_mask."""
    t = segment_ids_BT.shape[1]
    slot_T = jnp.arange(t, dtype=jnp.int32)
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return attention_mask(segment_ids_BT > 0, slot_T, slot_T, window) & same_BTS


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Grouped-query attention; scores and softmax in float32."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(q_BTNH.dtype),
                         preferred_element_type=jnp.float32) * (h ** -0.5)
    # A finite floor, not -inf: a query with no valid key (a left-pad row) gets a uniform
    # softmax instead of NaN; its output is never used.
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
    return o_BTKGH.reshape(b, t, n * h).astype(q_BTNH.dtype)


ATTENTION_BLOCK = 64  # query rows per block of causal_attend


def causal_attend(q_BTNH, k_BTKH, v_BTKH, mask_BTT, block: int | None = None):
    """attend over one set of slots with a causal mask (no KV cache: training, scoring,
    prefill). Query block i reads the keys of blocks 0..i only, so the blocks above the
    diagonal, masked whole, are never computed: at T = 256 and blocks of 64, 6 of 16 score
    tiles, forward and backward. Equal to attend for every query with a valid key; a query
    with none (left padding, whose output is never used) averages fewer keys."""
    t, block = q_BTNH.shape[1], block or ATTENTION_BLOCK  # read at trace time (benches vary it)
    if t <= block:
        return attend(q_BTNH, k_BTKH, v_BTKH, mask_BTT)
    outs = []
    for lo in range(0, t, block):
        hi = min(lo + block, t)
        outs.append(attend(q_BTNH[:, lo:hi], k_BTKH[:, :hi], v_BTKH[:, :hi],
                           mask_BTT[:, lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


# ---- input checks (Python, on shapes and concrete values: nothing runs under tracing) -----

def concrete(x) -> np.ndarray | None:
    """x as a numpy array if Python can read it now; None under jit / grad tracing (asking
    the array itself: an isinstance test on jax.core.Tracer missed the tracer of a value
    computed inside a jitted value_and_grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_token_ids(ids, vocab_size: int, where: str = "model") -> None:
    """Token ids must be integers in [0, vocab_size): the embedding lookup would give NaN rows
    for ids >= vocab_size and wrap -1 to the last id, silently. The dtype is checked always
    (static); the values only when concrete, so a jitted step pays nothing."""
    dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{where}: token ids must be integers, got dtype {dtype}")
    ids = concrete(ids)
    if ids is None:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: {int(bad.sum())} token id(s) outside [0, {vocab_size}) (the model's "
            f"vocab_size), e.g. {int(ids[at])} at index {at}; encode with the model's own "
            f"tokenizer, and pad with an id the vocabulary has")


def check_positions(n: int, config: LlamaConfig, where: str = "model", fix: str = "") -> None:
    """n positions (prompt + new tokens, a sequence, a bucket) must fit max_position_embeddings:
    past it RoPE runs on positions the model never saw and the output is garbage."""
    limit = config.max_position_embeddings
    if n > limit:
        raise ValueError(f"{where}: {n} positions exceed the model's max_position_embeddings = "
                         f"{limit}; {fix or f'shorten the input to at most {limit} tokens'}")


def check_rows(config: LlamaConfig, rows, where: str, fix: str = "", extra: int = 0) -> None:
    """Token rows (lists of ids, before padding) of an evaluation or a prompt batch: every id in
    the vocabulary and every row, plus `extra` new tokens, within the model's positions."""
    rows = [np.asarray(r, np.int64) for r in rows]
    if not rows:
        return
    check_positions(max(map(len, rows)) + extra, config, where, fix)
    flat = np.concatenate(rows)
    bad = np.flatnonzero((flat < 0) | (flat >= config.vocab_size))
    if bad.size:  # named by its row: the first row holding a bad id
        row = int(np.searchsorted(np.cumsum([len(r) for r in rows]), bad[0], side="right"))
        check_token_ids(rows[row], config.vocab_size, f"{where}: row {row}")


def check_tokenizer_vocab(config: LlamaConfig, n_tokens: int, tokenizer: str) -> None:
    """The tokenizer and the embedding must agree both ways. More tokens than rows index past
    the table (NaN logits); many more rows than tokens means the tokenizer is another model's
    (SmolLM2's 49152 rows under the 259-id byte tokenizer train, at a far higher loss). The
    rows may exceed the tokens only by padding to a multiple of VOCAB_PAD_MULTIPLE."""
    rows = config.vocab_size
    fix = "use the model's own tokenizer (model.tokenizer: null / tokenizer=None)"
    if n_tokens > rows:
        raise ValueError(f"the tokenizer ({tokenizer}) has {n_tokens} tokens but the model's "
                         f"embedding has {rows} rows (vocab_size); {fix}")
    padded = -(-n_tokens // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if rows > padded:
        raise ValueError(f"the model's embedding has {rows} rows (vocab_size) but the tokenizer "
                         f"({tokenizer}) has only {n_tokens} tokens, more than padding to a "
                         f"multiple of {VOCAB_PAD_MULTIPLE} ({padded}) explains: it is another "
                         f"model's tokenizer; {fix}")


# ---- modules -----------------------------------------------------------------------------

class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = FrozenWeight(jnp.ones((dim,), param_dtype))

    def __call__(self, x_BTD):
        return rms_norm(x_BTD, self.weight.get_value(), self.eps)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.embedding = FrozenWeight(init(rngs.params(), (vocab, dim), param_dtype))

    def __call__(self, ids_BT, dtype):
        return jnp.take(self.embedding.get_value(), ids_BT, axis=0).astype(dtype)

    def attend(self, x_BTD):
        """Tied output head: x @ E.T."""
        return jnp.einsum("...d,vd->...v", x_BTD, self.embedding.get_value().astype(x_BTD.dtype))


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, linear_kw: dict, rngs: nnx.Rngs, prefix: str = ""):
        d, h = c.hidden_size, c.head_dim
        n, k = c.num_attention_heads, c.num_key_value_heads
        self.n, self.k, self.h = n, k, h

        def lin(i, o, name, bias):
            return Linear(i, o, use_bias=bias, rngs=rngs, name=f"{prefix}{name}", **linear_kw)

        self.q_proj = lin(d, n * h, "q_proj", c.biased_qkv)
        self.k_proj = lin(d, k * h, "k_proj", c.biased_qkv)
        self.v_proj = lin(d, k * h, "v_proj", c.biased_qkv)
        self.o_proj = lin(n * h, d, "o_proj", c.attention_bias)
        pd = linear_kw["param_dtype"]
        self.q_norm = nnx.data(RMSNorm(h, c.rms_norm_eps, pd) if c.qk_norm else None)
        self.k_norm = nnx.data(RMSNorm(h, c.rms_norm_eps, pd) if c.qk_norm else None)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv=None, index=None):
        b, t, _ = x_BTD.shape
        q_BTNH = self.q_proj(x_BTD).reshape(b, t, self.n, self.h)
        k_BTKH = self.k_proj(x_BTD).reshape(b, t, self.k, self.h)
        if self.q_norm is not None:  # per head, over H, before RoPE
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
        v_BTKH = self.v_proj(x_BTD).reshape(b, t, self.k, self.h)
        if kv is not None:
            k_BTKH, v_BTKH = write_slots(kv[0], k_BTKH, index), write_slots(kv[1], v_BTKH, index)
            out_BTD = self.o_proj(attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS))
        else:  # queries and keys are the same slots and the mask is causal by slot
            out_BTD = self.o_proj(causal_attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS))
        return out_BTD, (k_BTKH, v_BTKH)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: LlamaConfig, *, linear_kw: dict, rngs: nnx.Rngs, prefix: str = ""):
        d, f = c.hidden_size, c.intermediate_size

        def lin(i, o, name):
            return Linear(i, o, use_bias=c.mlp_bias, rngs=rngs, name=f"{prefix}{name}", **linear_kw)

        self.gate_proj, self.up_proj = lin(d, f, "gate_proj"), lin(d, f, "up_proj")
        self.down_proj = lin(f, d, "down_proj")

    def __call__(self, x_BTD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nnx.Module):
    def __init__(self, c: LlamaConfig, *, linear_kw: dict, param_dtype, rngs: nnx.Rngs,
                 prefix: str = ""):
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.attn = Attention(c, linear_kw=linear_kw, rngs=rngs, prefix=f"{prefix}attn/")
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.mlp = MLP(c, linear_kw=linear_kw, rngs=rngs, prefix=f"{prefix}mlp/")

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv=None, index=None):
        a_BTD, kv = self.attn(self.attn_norm(x_BTD), cos_BTH, sin_BTH, mask_BTS, kv, index)
        x_BTD = x_BTD + a_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), kv


def _run_block(block, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, index):
    return block(x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, index)


_run_block_remat = nnx.remat(_run_block)


class Llama(nnx.Module):
    """Causal LM. `model(ids_BT, attention_mask_BT=None)` -> logits_BTV (float32);
    with `cache=` a KVCache it returns (logits_BTV, updated cache). `hidden` + `logits` are the
    two halves, so callers can apply the head to the positions they score only.

    dtype: compute dtype (bf16 on accelerators; f32 for CPU parity). param_dtype: storage dtype of
    the float frozen weights. quant: "none" | "nf4" | "int4" for every Linear (random init; real
    checkpoints go through `moka_jax.models.hf.load_hf`); symmetric: int4 without zero points.
    remat: checkpoint each block.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 quant: str = "none", block_size: int = 64, double_quant: bool = False,
                 symmetric: bool = True, remat: bool = False, rngs: nnx.Rngs):
        self.config, self.dtype, self.remat = config, dtype, remat
        linear_kw = dict(quant=quant, block_size=block_size, double_quant=double_quant,
                         symmetric=symmetric, dtype=dtype, param_dtype=param_dtype)
        c = config
        self.embed = Embed(c.vocab_size, c.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            Block(c, linear_kw=linear_kw, param_dtype=param_dtype, rngs=rngs, prefix=f"layers/{i}/")
            for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, rngs=rngs, name="lm_head", **linear_kw)

    def __call__(self, input_ids_BT, attention_mask_BT=None, cache: KVCache | None = None, *,
                 segment_ids_BT=None, positions_BT=None):
        x_BTD, new_cache = self.hidden(input_ids_BT, attention_mask_BT, cache,
                                       segment_ids_BT=segment_ids_BT, positions_BT=positions_BT)
        logits_BTV = self.logits(x_BTD)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def logits(self, x_ND):
        """The output head on final hidden states (..., D) -> float32 logits (..., V)."""
        head = self.embed.attend if self.lm_head is None else self.lm_head
        return head(x_ND).astype(jnp.float32)

    def hidden(self, input_ids_BT, attention_mask_BT=None, cache: KVCache | None = None, *,
               segment_ids_BT=None, positions_BT=None):
        """(final normed hidden states (B, T, D), updated cache or None).

        Packed rows (training): segment_ids_BT (0 = padding, 1.. = example in the row) and
        positions_BT (restarting per example) replace attention_mask_BT; no cache.
        """
        b, t = input_ids_BT.shape
        check_token_ids(input_ids_BT, self.config.vocab_size)
        q_slot_T = jnp.arange(t, dtype=jnp.int32)
        windows = self.config.layer_windows
        if segment_ids_BT is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training; the KV cache "
                                 "path takes attention_mask")
            masks = {w: segment_mask(segment_ids_BT, w) for w in set(windows)}
            if positions_BT is None:
                raise ValueError("packed rows need positions_BT (restarting per example)")
            index = None
        else:
            mask_BT = (jnp.ones((b, t), bool) if attention_mask_BT is None
                       else jnp.asarray(attention_mask_BT).astype(bool))
            if cache is None:
                index, key_valid_BS, k_slot_S, prior_B = None, mask_BT, q_slot_T, None
            else:
                index = cache.index
                key_valid_BS = write_slots(cache.mask_BS, mask_BT, index)
                k_slot_S = jnp.arange(cache.max_len, dtype=jnp.int32)
                q_slot_T = q_slot_T + index
                prior_B = jnp.sum(cache.mask_BS, axis=-1, dtype=jnp.int32)
            if positions_BT is None:
                positions_BT = positions_from_mask(mask_BT, prior_B)
            masks = {w: attention_mask(key_valid_BS, q_slot_T, k_slot_S, w) for w in set(windows)}
        if attention_mask_BT is None and cache is None and segment_ids_BT is None:
            check_positions(t, self.config)  # static: positions 0 .. t-1
        elif (pos := concrete(positions_BT)) is not None and pos.size:  # eager; padding not counted
            check_positions(int(pos.max()) + 1, self.config)
        cos_BTH, sin_BTH = rope_cos_sin(positions_BT, rope_inv_freq(self.config))

        run = _run_block_remat if self.remat else _run_block
        x_BTD = self.embed(input_ids_BT, self.dtype)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, (k, v) = run(block, x_BTD, cos_BTH, sin_BTH, masks[windows[i]], kv, index)
            new_k.append(k)
            new_v.append(v)
        x_BTD = self.norm(x_BTD)
        if cache is None:
            return x_BTD, None
        return x_BTD, KVCache(k=tuple(new_k), v=tuple(new_v), mask_BS=key_valid_BS,
                              index=index + t)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch, max_len, dtype or self.dtype)
