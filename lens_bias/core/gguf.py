"""GGUF files → Hugging Face directories, once, into the cache.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`, with the `gguf` and
`accelerate` packages) and dequantizes to float32. Its model keeps the GGUF `quantization_config` and
refuses `save_pretrained`; a model built from the same config without that entry takes the state dict
(every key matches, logits identical) and saves. The folder is written under a temporary name and
renamed, with `lens_bias_source.json` recording the GGUF's sha256, so a half-converted copy never
loads and a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ModelLoadError
from .model_names import ModelEntry, cache_dir

SOURCE_FILE = "lens_bias_source.json"
_MAGIC = b"GGUF"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(path: Path, digest: str) -> Path:
    """The cache folder of an arbitrary GGUF file's conversion, keyed by its content."""
    return cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"


def read_source(folder: Path) -> dict | None:
    """The conversion record of a converted folder, or None when there is none (not converted, or partial)."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise ModelLoadError(f"reading {path.name} needs the packages gguf and accelerate: "
                                 "pip install gguf accelerate") from None


def _read(path: Path):
    """(tokenizer, plain float32 model) from a GGUF file; one line for what transformers refuses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the GGUF reader raises ValueError, KeyError, struct errors, ...
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        why = "its architecture is not supported by transformers' GGUF loader" if "not supported" in text else \
            "it is truncated, corrupt or not readable by transformers' GGUF loader"
        raise ModelLoadError(f"cannot read {path}: {why} ({type(e).__name__}: {text})") from None
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    arch = type(gguf_model).__name__
    cfg["architectures"] = [arch]
    plain = type(gguf_model)(type(gguf_model.config)(**cfg))
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return tok, plain.eval()


def convert_gguf(path: str | Path, out: str | Path | None = None, *, entry: ModelEntry | None = None,
                 progress: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face directory `out` (default: the cache folder for its content);
    an existing conversion of the same file is reused. Returns the folder."""
    path = Path(path).expanduser().resolve()
    _check_file(path)
    steps = tqdm(total=3, desc=f"convert {path.name}", disable=not progress, unit="step")
    steps.set_postfix_str("sha256")
    digest = sha256_file(path)
    steps.update()
    out = Path(out) if out is not None else gguf_cache_dir(path, digest)
    old = read_source(out)
    if old is not None and old.get("gguf_sha256") == digest:
        steps.close()
        return out
    if old is None and out.is_dir() and any(out.iterdir()):
        raise ModelLoadError(f"{out} holds files that are not a conversion of lens_bias's; choose another folder")
    if entry is not None and entry.sha256 and digest != entry.sha256:
        raise ModelLoadError(f"{path} has sha256 {digest}, not the {entry.sha256} recorded for {entry.name!r}")
    steps.set_postfix_str("dequantize")
    t = time.perf_counter()
    tok, model = _read(path)
    steps.update()
    steps.set_postfix_str("save")
    record = {"gguf_file": str(path), "gguf_sha256": digest, "gguf_bytes": path.stat().st_size,
              "architecture": type(model).__name__, "dtype": "float32", "seconds": None,
              **({"name": entry.name, "hub_id": entry.hub_id, "licence": entry.licence, "package": entry.package,
                  "package_version": entry.package_version, "note": entry.note} if entry else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(work)
        tok.save_pretrained(work)
        record["seconds"] = round(time.perf_counter() - t, 1)
        (work / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    steps.update()
    steps.close()
    return out
