"""The Hugging Face architectures the decoder family (`models.llama`) loads, and what each reads.

LLaMA, Mistral, Qwen2 / Qwen2.5 and Qwen3 are one decoder (RMSNorm, RoPE, GQA, SwiGLU); their
differences are options of `LlamaConfig`:
    qkv_bias        Qwen2: q/k/v projections carry a bias, o_proj none (no config key sets it)
    qk_norm         Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window  Mistral (every layer) and Qwen2 / Qwen3 (layers by layer_types): a query
                    sees the keys at most sliding_window - 1 tokens back
An architecture named here as REFUSED (Gemma) is told apart from an unknown one: its message
says what the family code lacks for it.

Pure functions over config.json dicts: `family_of` resolves `architectures` / `model_type`,
`read_family_keys` turns the family's own keys into LlamaConfig fields (refusing values we do
not implement), `family_hf_keys` writes them back for an export transformers loads.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str   # transformers class, config.json "architectures"[0]
    model_type: str     # config.json "model_type"
    checkpoints: str    # what users bring (README table)
    bias_keys: tuple = ()      # bias switches its config.json may set (LLaMA's two, Qwen3's one)
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding: str = "none"      # how config.json asks for a window: "none" | "all" | "by_layer"


FAMILIES = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama", "LLaMA-2, LLaMA-3 / 3.1 / 3.2, SmolLM2, TinyLlama",
           bias_keys=("attention_bias", "mlp_bias")),
    Family("MistralForCausalLM", "mistral", "Mistral-7B v0.1 (window 4096), v0.2 / v0.3",
           sliding="all"),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2, Qwen2.5 (0.5B-72B), Qwen2.5-Coder / Math",
           qkv_bias=True, sliding="by_layer"),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3 dense (0.6B-32B)", bias_keys=("attention_bias",),
           qk_norm=True, sliding="by_layer"),
)}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}

_GEMMA = ("needs GeGLU (gelu_pytorch_tanh), embeddings scaled by sqrt(hidden_size), RMSNorm "
          "with a (1 + weight) offset{extra}; the decoder family does not model these "
          "(README: Supported architectures)")
REFUSED = {
    "GemmaForCausalLM": ("gemma", _GEMMA.format(extra="")),
    "Gemma2ForCausalLM": ("gemma2", _GEMMA.format(
        extra=", norms after attention and MLP as well as before, attention and final-logit "
              "soft-capping, query scaling by query_pre_attn_scalar and alternating "
              "local / global attention")),
    "Gemma3ForCausalLM": ("gemma3_text", _GEMMA.format(
        extra=", norms after attention and MLP as well as before, per-head q/k norms, a "
              "second RoPE base for local layers and alternating local / global attention")),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())


def family_of(d: dict) -> Family:
    """The family config.json names by `architectures` and `model_type`, or a ValueError that
    names the architecture and lists the supported ones."""
    archs = d.get("architectures") or []
    arch, model_type = (archs[0] if archs else None), d.get("model_type")
    refused = REFUSED.get(arch) or next((v for k, v in REFUSED.items() if v[0] == model_type),
                                        None)
    if refused is not None:
        name = arch or next(k for k, v in REFUSED.items() if v[0] == model_type)
        raise ValueError(f"architecture {name} is not supported: it {refused[1]}; supported: "
                         f"{supported()}")
    family = FAMILIES.get(arch) if arch else BY_MODEL_TYPE.get(model_type)
    if family is None:
        what = (f"architecture {arch!r} (model_type {model_type!r})" if arch or model_type
                else "no architecture (neither 'architectures' nor 'model_type' is set)")
        raise ValueError(f"{what} is not supported; supported: {supported()}")
    if model_type is not None and model_type != family.model_type:
        raise ValueError(f"architectures names {family.architecture} but model_type is "
                         f"{model_type!r} (expected {family.model_type!r}): transformers would "
                         "build one and this loader the other; fix config.json")
    return family


def read_family_keys(family: Family, d: dict) -> dict:
    """LlamaConfig fields from the family's own config.json keys (biases, windows, q/k norm).

    A key this family's transformers class does not read, set to a value that would change the
    model, is refused, as is a value we do not implement."""
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key) and key not in family.bias_keys:
            raise ValueError(f"{key}=true, but {family.architecture} has no {key} option "
                             "(transformers ignores it); remove the key from config.json")
    if d.get("use_mrope"):
        raise ValueError("use_mrope=true is multimodal RoPE (Qwen2-VL); the text decoder "
                         "family uses 1-D RoPE; use a text-only checkpoint")
    if d.get("attention_dropout"):
        raise ValueError(f"attention_dropout={d['attention_dropout']} is not implemented (the "
                         "decoder family trains without dropout); set it to 0.0")
    window, layer_types = _windows(family, d)
    return dict(attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)), qkv_bias=family.qkv_bias,
                qk_norm=family.qk_norm, sliding_window=window, layer_types=layer_types)


def _windows(family: Family, d: dict) -> tuple[int | None, tuple]:
    """(sliding_window or None, per-layer types) as transformers resolves them."""
    window, layers = d.get("sliding_window"), d["num_hidden_layers"]
    if family.sliding == "none":
        if window is not None or d.get("layer_types"):
            raise ValueError(f"{family.architecture} has no sliding-window attention, but "
                             "config.json sets sliding_window / layer_types; remove them")
        return None, ()
    if family.sliding == "all":
        if d.get("layer_types"):
            raise ValueError(f"layer_types is not read by {family.architecture} (transformers "
                             "applies sliding_window to every layer); remove it from config.json")
        return _checked_window(window), ()
    # by_layer (Qwen2 / Qwen3): the window only counts with use_sliding_window; layer_types,
    # when given, says which layers use it, else layers from max_window_layers on do.
    window = window if d.get("use_sliding_window", False) else None
    types = d.get("layer_types")
    if types is None:
        start = d.get("max_window_layers", layers)
        types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                 for i in range(layers)]
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad or len(types) != layers:
        raise ValueError(f"layer_types must list {layers} entries of {LAYER_TYPES}; got "
                         f"{len(types)} with {bad or 'no unknown types'}")
    if "sliding_attention" in types and window is None:
        raise ValueError("layer_types has sliding_attention layers but no window (set "
                         "use_sliding_window=true and sliding_window)")
    return _checked_window(window), tuple(types)


def _checked_window(window):
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer or null; got {window!r}")
    return window


def family_hf_keys(family: Family, c) -> dict:
    """The family's own config.json keys for LlamaConfig `c` (the inverse of read_family_keys)."""
    if family.sliding == "all" and "full_attention" in c.layer_types:
        raise ValueError(f"{family.architecture} applies one window to every layer; "
                         "per-layer types cannot be written")
    out = {key: getattr(c, key) for key in family.bias_keys}
    if family.sliding == "all":
        out["sliding_window"] = c.sliding_window
    elif family.sliding == "by_layer":
        types = list(c.layer_types) or ["full_attention"] * c.num_hidden_layers
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        out.update(use_sliding_window=bool(sliding), sliding_window=c.sliding_window,
                   max_window_layers=sliding[0] if sliding else c.num_hidden_layers,
                   layer_types=types)
    return out
