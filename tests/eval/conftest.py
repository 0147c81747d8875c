"""Fixtures shared by the eval tests: the byte tokenizer and a tiny random LLaMA."""

import pytest

from moka_jax.data import byte_tokenizer
from tests.eval import tiny_model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()
