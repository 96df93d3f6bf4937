"""Reading data sets: files through Hugging Face `datasets` (Arrow, memory-mapped), with errors that
name the file and line; the data sets shipped in data/; items as a `datasets.Dataset` or a list.

Every loader takes a `source`: a path (JSONL, a JSON list or CSV), a `datasets.Dataset`, a list of
dicts, a hub name ('owner/name[:split]', with network or a filled cache), or a shipped name (e.g.
load_bbq('Age')). Files are read by `datasets`; only when it cannot read one is the file scanned
to say which line is wrong.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from ..core.errors import DataError
from ..core.files import shipped

#: a data set as the functions take it: a datasets.Dataset or a list of dicts
Items = Union["datasets.Dataset", Sequence[dict]]  # noqa: F821
Source = Union[str, os.PathLike, "datasets.Dataset", Sequence[dict]]  # noqa: F821

#: the data sets shipped in data/datasets (licences and origins in data/datasets/README.md)
SHIPPED_DATASETS = {
    "professions": "professions/professions.json",
    "professions_female": "professions/professions_female_stereo.json",
    "professions_male": "professions/professions_male_stereo.json",
    "winobias": "winobias",
    "winogender": "winogender",
    "strategyqa": "strategyqa/train.json",
    "gsm8k": "gsm8k/test.jsonl",
    "brown": "brown/neutral.txt",
    "bbq/Age": "bbq/Age.jsonl",
    "bbq/Nationality": "bbq/Nationality.jsonl",
    "bbq/Religion": "bbq/Religion.jsonl",
}


def shipped_dataset(name: str) -> Path:
    """The path of a data set shipped in data/datasets ('professions', 'winobias', 'bbq/Age', ...)."""
    if name not in SHIPPED_DATASETS:
        raise DataError(f"no shipped data set {name!r}; shipped: {', '.join(SHIPPED_DATASETS)}")
    return shipped("datasets", *SHIPPED_DATASETS[name].split("/"))


def read_text_file(path: str | os.PathLike) -> str:
    """A text file's contents (UTF-8, a byte-order mark dropped); a DataError naming the file when it
    is missing, a directory, empty or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; a data file is needed")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    return text


def _is_json_list(text: str) -> bool:
    return text.lstrip().startswith("[")


def _diagnose(path: Path, text: str, error: Exception) -> DataError:
    """Find the line of a file that datasets could not read."""
    if path.suffix.lower() != ".csv" and not _is_json_list(text):
        types: dict[str, tuple[str, int]] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return DataError(f"{path}:{n}: malformed JSON line ({e.msg})")
            if not isinstance(row, dict):
                return DataError(f"{path}:{n}: a JSON object is needed, got {type(row).__name__}")
            for k, v in row.items():
                t = type(v).__name__
                if v is not None and k in types and types[k][0] != t and {t, types[k][0]} != {"int", "float"}:
                    return DataError(f"{path}:{n}: field {k!r} is {t} here but {types[k][0]} on line {types[k][1]}")
                if v is not None:
                    types.setdefault(k, (t, n))
    elif _is_json_list(text):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            return DataError(f"{path}: item {bad + 1} of the JSON list is not an object")
    msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{path}: cannot be read as a table ({msg[:200]})")


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def read_dataset(path: str | os.PathLike) -> "datasets.Dataset":  # noqa: F821
    """A JSONL, JSON-list or CSV file as a `datasets.Dataset` (Arrow, memory-mapped)."""
    path = Path(path)
    text = read_text_file(path)
    datasets = _quiet_datasets()
    if path.suffix.lower() == ".csv":
        builder, kw = "csv", {"encoding": "utf-8-sig"}
    else:
        builder, kw = "json", {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to load JSON" line: we name the line
    try:
        ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **kw)
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types; we name the line instead
        raise _diagnose(path, text, e) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    return ds


def _looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).suffix


def hub_dataset(name: str, split: str | None = None) -> "datasets.Dataset":  # noqa: F821
    """A data set from the Hugging Face hub ('owner/name' or 'owner/name:split'), when the network or
    the local cache has it; a clear DataError otherwise."""
    datasets = _quiet_datasets()
    name, _, tail = name.partition(":")
    try:
        return datasets.load_dataset(name, split=split or tail or "train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no such split
        raise DataError(f"data set {name!r} is neither a local file nor loadable from the Hugging Face hub or its "
                        f"cache ({type(e).__name__}); without network, download it elsewhere and pass the file") from None


def line_of(path: str | os.PathLike, index: int) -> str:
    """'file:line' of record `index` (0-based) of a file read by read_dataset."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return f"{path}:{index + 2}"
    text = read_text_file(path)
    if _is_json_list(text):
        return f"{path} item {index + 1}"
    seen = -1
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            seen += 1
            if seen == index:
                return f"{path}:{n}"
    return f"{path} record {index + 1}"


def located(path: str | os.PathLike, error: Exception) -> Exception:
    """`error` (about record `error.item`, 0-based, when it says so) as the same type with the file and
    line named: 'data.jsonl:3: ...'."""
    item = getattr(error, "item", None)
    where = line_of(path, item) if isinstance(item, int) else str(path)
    message = str(error)
    if isinstance(item, int):
        message = re.sub(r"^(yes/no item|prompt|item) \d+: ", "", message)
    return type(error)(f"{where}: {message}")


def load_records(source: Source) -> tuple["datasets.Dataset | list[dict]", Any]:  # noqa: F821
    """(records, where) from a path, a datasets.Dataset or a list of dicts; `where(i)` names record i
    for error messages ('file:line', or 'item i')."""
    try:
        import datasets
        is_dataset = isinstance(source, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = False
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if isinstance(source, str) and not path.exists() and _looks_like_hub_name(source):
            return hub_dataset(source), lambda i: f"{source} record {i}"
        ds = read_dataset(path)
        return ds, lambda i: line_of(path, i)
    if is_dataset:
        if len(source) == 0:
            raise DataError("the data set is empty")
        return source, lambda i: f"record {i}"
    if isinstance(source, dict) and source and all(isinstance(v, list) for v in source.values()):
        n = len(next(iter(source.values())))  # a sliced Dataset: columns of equal length
        source = [{k: v[i] for k, v in source.items()} for i in range(n)]
    if not isinstance(source, Iterable) or isinstance(source, (str, bytes, dict)):
        raise DataError(f"expected a data file, a datasets.Dataset or a list of dicts, got {type(source).__name__}")
    rows = list(source)
    if not rows:
        raise DataError("the data set is empty")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"item {bad} is a {type(rows[bad]).__name__}, not a dict")
    return rows, lambda i: f"item {i}"


def as_items(items) -> Items:
    """A data set as the functions take it: a datasets.Dataset as it is, the columns of a sliced
    Dataset (ds[:30], a dict of equal-length lists) or any iterable of dicts as a list of dicts."""
    if hasattr(items, "select") and hasattr(items, "column_names"):
        return items
    if isinstance(items, dict):
        cols = list(items.values())
        if not cols or not all(isinstance(c, list) and len(c) == len(cols[0]) for c in cols):
            raise DataError("expected items (a Dataset, a list of dicts or a Dataset slice), got a dict")
        return [{k: v[i] for k, v in items.items()} for i in range(len(cols[0]))]
    items = list(items)
    bad = next((i for i, r in enumerate(items) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"item {bad} is a {type(items[bad]).__name__}, not a dict")
    return items


def take(items: Items, lo: int, hi: int) -> list[dict]:
    """Items lo..hi as a list of dicts (a Dataset is read only for that range)."""
    items = as_items(items)
    if hasattr(items, "select"):
        return [dict(r) for r in items.select(range(lo, min(hi, len(items))))]
    return [dict(r) for r in items[lo:hi]]


def require(record: dict, fields: Iterable[str], where: str) -> None:
    """A DataError naming the fields a record lacks (absent, or null)."""
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
