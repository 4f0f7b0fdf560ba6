"""Fixtures for model tests; the builders live in tests/helpers.py so other packages can reuse them."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_model, tiny_tokenizer


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_model()
