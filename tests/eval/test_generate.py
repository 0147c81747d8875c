"""Beam search against transformers' generate(num_beams=N, do_sample=False) on a tiny random
LLaMA in f32: exact token ids (tolerance 0), left-padded prompts of different lengths, beams that
end on eos early, and num_beams=1 as the greedy path."""

import jax.numpy as jnp
import numpy as np
import pytest

from moka_jax.eval.generate import beam_search, generate
from moka_jax.models.hf import load_hf
from tests.models.conftest import save_tiny, tiny_hf_model, torch

PAD = 7  # not 0: HF's beam search pads with eos_token_id[0] when pad_token_id is 0
LENGTHS = (5, 9, 3)  # real tokens per prompt, left-padded to 9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_hf_model("llama2", seed=1)
    model, _ = load_hf(save_tiny(hf, tmp_path_factory.mktemp("llama2")), "none", dtype=jnp.float32)
    return hf, model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    t = max(LENGTHS)
    ids = np.full((len(LENGTHS), t), PAD, np.int32)
    mask = np.zeros((len(LENGTHS), t), np.int32)
    for r, n in enumerate(LENGTHS):
        ids[r, t - n:], mask[r, t - n:] = rng.randint(10, 256, n), 1
    return ids, mask


def hf_generate(hf, ids, mask, eos, **kw):
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                          eos_token_id=list(eos), pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:].numpy()


NO_EOS = (253, 254, 255)  # ids the tiny model does not pick here; 3 eos ids, as below: K = 4N


def beams(model, ids, mask, eos, **kw):
    return generate(model, ids, mask, max_new_tokens=8, eos_token_ids=eos, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("num_beams,early_stopping,length_penalty", [
    (2, False, 1.0), (4, False, 1.0),   # LLM-Adapters: 4 beams, HF's defaults otherwise
    (3, True, 1.0), (3, "never", 0.5)])
def test_beam_search_equals_transformers(models, prompts, num_beams, early_stopping,
                                         length_penalty):
    """Tolerance 0 on token ids, with no eos chosen and with eos chosen by some beams."""
    hf, model = models
    ids, mask = prompts
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    free = beams(model, ids, mask, NO_EOS, **kw)
    assert free.shape == (3, 8) and not np.isin(free, NO_EOS).any()
    assert free.tolist() == hf_generate(hf, ids, mask, NO_EOS, max_new_tokens=8, **kw).tolist()
    # Each prompt's best beam's 5th token as an eos: some beams now end on it.
    eos = tuple(int(e) for e in free[:, 4])
    ours = beams(model, ids, mask, eos, **kw)
    assert ours.tolist() == hf_generate(hf, ids, mask, eos, max_new_tokens=8, **kw).tolist()
    ends = [np.flatnonzero(np.isin(row, eos)) for row in ours]
    early = [r for r, e in enumerate(ends) if len(e) and e[0] < ours.shape[1] - 1]
    assert early, ours  # eos kept, then padding (PAD), as HF pads
    for r in early:
        assert (ours[r, ends[r][0] + 1:] == PAD).all()


def test_beam_search_done_rule_and_width_equal_transformers(models, prompts):
    """Six eos ids (K = 14 candidates for 2 beams): prompts 0 and 2 are done (no running beam
    can beat their finished ones) before the last step, which changes their result (checked by
    disabling the rule), and every best hypothesis ends early, so the output is narrower."""
    hf, model = models
    ids, mask = prompts
    free = beams(model, ids, mask, NO_EOS, num_beams=2)
    eos = tuple(sorted(set(free[:, 2:4].ravel().tolist())))
    ours = beams(model, ids, mask, eos, num_beams=2)
    assert ours.shape[1] < 8
    assert ours.tolist() == hf_generate(hf, ids, mask, eos, max_new_tokens=8,
                                        num_beams=2).tolist()


def test_num_beams_1_is_greedy(models, prompts):
    hf, model = models
    ids, mask = prompts
    eos = (int(generate(model, ids, mask, max_new_tokens=6)[1, 3]),)  # ends prompt 1 early
    ours = generate(model, ids, mask, max_new_tokens=6, eos_token_ids=eos, pad_token_id=PAD,
                    num_beams=1)
    np.testing.assert_array_equal(ours, generate(model, ids, mask, max_new_tokens=6,
                                                 eos_token_ids=eos, pad_token_id=PAD))
    assert ours.tolist() == hf_generate(hf, ids, mask, eos, max_new_tokens=6, num_beams=1).tolist()
    assert ours[1, 3] == eos[0] and (ours[1, 4:] == PAD).all()


def test_beam_search_refuses_sampling(models, prompts):
    with pytest.raises(ValueError, match="temperature 0"):
        generate(models[1], *prompts, num_beams=2, temperature=0.7)
