"""What Python users enter is checked where they enter it: token ids against the vocabulary,
sequences and prompts (+ new tokens) against the model's positions, the tokenizer against the
embedding both ways, and model keys that would have no effect. One row a case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.config import ConfigError, ModelConfig, TinyModelConfig
from moka_jax.eval.commonsense import score_continuations
from moka_jax.data import DataError
from moka_jax.eval.generate import answer, beam_search, generate
from moka_jax.eval.mmlu import evaluate_mmlu
from moka_jax.eval.perplexity import perplexity, response_scores
from moka_jax.models import presets
from moka_jax.models.llama import Llama


@pytest.fixture(scope="module")
def model():
    """The tiny random model (vocab 259) with 64 positions."""
    return Llama(presets.tiny(max_position=64, layers=1), rngs=nnx.Rngs(0))


def ids(*shape, value=1):
    return np.full(shape, value, np.int32)


# (call on the model, error type, the message it must give)
INPUT_CASES = [
    (lambda m: m(ids(1, 4, value=259)), ValueError,
     r"model: 4 token id\(s\) outside \[0, 259\) \(the model's vocab_size\), e\.g\. 259 at "
     r"index \(0, 0\); encode with the model's own tokenizer"),
    (lambda m: m(jnp.asarray([[5, -1]])), ValueError, r"outside \[0, 259\).*e\.g\. -1 at index \(0, 1\)"),
    (lambda m: m(np.ones((1, 4), np.float32)), TypeError, r"model: token ids must be integers, got dtype float32"),
    (lambda m: m(ids(1, 65)), ValueError,
     r"model: 65 positions exceed the model's max_position_embeddings = 64; shorten the input"),
    (lambda m: m(ids(1, 70), np.arange(70)[None] >= 3), ValueError, r"67 positions exceed"),
    (lambda m: generate(m, ids(2, 3, value=300)), ValueError,
     r"generate: input_ids: 6 token id\(s\) outside \[0, 259\)"),
    (lambda m: generate(m, np.asarray([[-1, 5, 6]]), np.asarray([[1, 1, 1]])), ValueError,
     r"generate: input_ids: 1 token id\(s\) outside \[0, 259\).*e\.g\. -1 at index \(0, 0\)"),
    (lambda m: generate(m, ids(1, 40), max_new_tokens=30), ValueError,
     r"generate: 70 positions exceed the model's max_position_embeddings = 64; the longest "
     r"prompt has 40 tokens and max_new_tokens is 30: lower max_new_tokens to at most 24"),
    (lambda m: generate(m, ids(1, 64), max_new_tokens=1), ValueError,
     r"generate: 65 positions exceed .*: shorten the prompt, it fills them alone"),
    (lambda m: beam_search(m, ids(1, 60), num_beams=2, max_new_tokens=8), ValueError,
     r"generate: 68 positions exceed"),
    (lambda m: generate(m, ids(3)), ValueError, r"input_ids must be \(batch, length\)"),
    (lambda m: response_scores(m, [ids(80)], [ids(80)]), ValueError,
     r"response_scores: 80 positions exceed .* = 64; tokenize with cutoff_len <= 64"),
    (lambda m: score_continuations(m, [list(range(60))], [[[1] * 5]]), ValueError,
     r"score_continuations: 65 positions exceed"),
    (lambda m: score_continuations(m, [[1, 2]], [[[400]]]), ValueError,
     r"score_continuations: row 0: 1 token id\(s\) outside \[0, 259\) \(the model's "
     r"vocab_size\), e\.g\. 400 at index \(2,\)"),
    (lambda m: answer(m, m.config, None, ["hi"]), DataError,
     r"prompt_batch: no tokenizer .*moka_jax\.load\(\.\.\., tokenizer=DIR"),
    (lambda m: perplexity(m, None, "x.json"), DataError, r"perplexity: no tokenizer"),
    (lambda m: evaluate_mmlu(m, object(), "no-such-dir", max_len=100), ValueError,
     r"evaluate_mmlu: max_len: 100 positions exceed .* lower max_len to at most 64"),
]


@pytest.mark.parametrize("call,error,message", INPUT_CASES,
                         ids=[str(i) for i in range(len(INPUT_CASES))])
def test_bad_inputs_are_refused_before_the_model_runs(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)


def test_padding_does_not_count_and_jit_pays_nothing(model):
    """70 slots of which 64 are real fit; under jit the value checks are skipped (traced)."""
    mask = np.arange(70)[None] >= 6
    assert model(ids(1, 70), mask).shape == (1, 70, 259)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids(1, 4, value=258))
    assert logits.shape == (1, 4, 259)


# (tokenizer, tiny model dims, the message it must give; None: loads)
VOCAB_CASES = [
    ("bytes", dict(vocab=200), r"the tokenizer \(bytes\) has 259 tokens but the model's "
                               r"embedding has 200 rows \(vocab_size\); use the model's own"),
    ("bytes", dict(vocab=49152), r"embedding has 49152 rows \(vocab_size\) but the tokenizer "
                                 r"\(bytes\) has only 259 tokens, more than padding to a multiple "
                                 r"of 1024 \(1024\) explains: .*use the model's own tokenizer"),
    ("bytes", dict(vocab=1024), None),  # padding to a multiple of 1024 is normal
]


@pytest.mark.parametrize("tokenizer,tiny,message", VOCAB_CASES,
                         ids=[str(i) for i in range(len(VOCAB_CASES))])
def test_tokenizer_and_embedding_agree_both_ways(tokenizer, tiny, message):
    load = lambda: mj.load("random", quant="none", dtype=jnp.float32, tokenizer=tokenizer,
                           tiny={**tiny, "layers": 1})
    if message is None:
        assert load()[0].config.vocab_size == tiny["vocab"]
        return
    with pytest.raises(ValueError, match=message):
        load()


# (model section, the message it must give): a key with no effect is refused
MODEL_KEY_CASES = [
    (dict(path="smollm2", tiny=TinyModelConfig(hidden=32)),
     r"model\.tiny \(hidden\) shapes the random model only, but model\.path is 'smollm2'"),
    (dict(quant="int4", double_quant=True),
     r"model\.double_quant quantises nf4 absmax only, but model\.quant is 'int4'"),
    (dict(quant="nf4", int4_symmetric=False),
     r"model\.int4_symmetric applies to quant int4 only, but model\.quant is 'nf4'"),
    (dict(quant="none", block_size=128),
     r"model\.block_size = 128 is the 4-bit block size, but model\.quant is 'none'"),
]


@pytest.mark.parametrize("section,message", MODEL_KEY_CASES,
                         ids=[str(i) for i in range(len(MODEL_KEY_CASES))])
def test_model_keys_without_effect_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        mj.load(ModelConfig(**{"path": "random", "tokenizer": "bytes", **section}))


def test_int4_symmetric_reaches_the_weights():
    model, _ = mj.load(ModelConfig(path="random", tokenizer="bytes", quant="int4",
                                   int4_symmetric=False, dtype="float32",
                                   tiny=TinyModelConfig(layers=1)))
    kernel = model.layers[0].attn.q_proj.kernel.get_value()
    assert kernel.kind == "int4" and not kernel.symmetric and kernel.zeros is not None
