"""Data-layer test fixtures: the default pseudonym key of every test lives in its tmp folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _key_file_in_tmp(tmp_path_factory, monkeypatch):
    """Never create ~/.config/llava-ultra/deid.key from a test: point the default elsewhere."""
    monkeypatch.setenv("LLAVA_ULTRA_KEY_FILE", str(tmp_path_factory.mktemp("key") / "deid.key"))
