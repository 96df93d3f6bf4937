"""What the four sections share: the stage cache, the run context and budgets, the section result, formatting
of figures with their intervals, the verdict rule, the figures page."""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lens_bias.core.files import write_text
from lens_bias.core.stats import Interval, bootstrap

FORMAT = 1
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------
# Stage cache
# ---------------------------------------------------------------------------------------
def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, allow_nan=True, default=str).encode()


def sha256(value) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def code_fingerprint() -> str:
    """sha256 of lens_bias's source: a stage cached by other code of the toolkit is computed again. (These
    benchmark modules are not in it, so that a change of a table's wording keeps the cache; a change of what a
    stage computes bumps FORMAT.)"""
    import lens_bias

    h = hashlib.sha256()
    root = Path(lens_bias.__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


class Stages:
    """Stage results (JSON values) cached in DIR/<section>/<stage>.json with the key they were computed under
    (sha256 of the model's weights, lens_bias's code, FORMAT, the stage's name and options) and the sha256 of the value: a
    changed key or a changed value (an edited or truncated file) is computed again. Written atomically."""

    def __init__(self, out: Path | None, base: dict):
        self.dir, self.base = (Path(out) if out is not None else None), base
        self.log: list[dict] = []

    def get(self, section: str, name: str, options: dict, compute: Callable[[], object]):
        key = sha256({**self.base, "format": FORMAT, "section": section, "stage": name, "options": options})
        path = self.dir / section / f"{name}.json" if self.dir is not None else None
        if path is not None and path.is_file():
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict) and rec.get("key") == key and rec.get("sha256") == sha256(rec.get("value")):
                self.log.append({"section": section, "stage": name, "seconds": 0.0, "cached": True,
                                 "computed_in": rec.get("seconds")})
                return rec["value"]
            if isinstance(rec, dict) and rec.get("key") == key:
                warnings.warn(f"{path}: its value does not match its checksum; computing the stage again")
        t = time.perf_counter()
        value = json.loads(_canonical(compute()))  # what a rerun will read back
        seconds = time.perf_counter() - t
        self.log.append({"section": section, "stage": name, "seconds": round(seconds, 1), "cached": False})
        if path is not None:
            rec = {"key": key, "sha256": sha256(value), "seconds": round(seconds, 1), "value": value}
            write_text(path, json.dumps(rec, allow_nan=True))
        return value


# ---------------------------------------------------------------------------------------
# Budgets: how many prompts, items, seeds and steps (sizes only; no option of a method)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    name: str
    # sections 1–2: professions
    locate_prompts: int = 20
    held_prompts: int = 36
    seeds: int = 10                 # random controls without training
    train_seeds: int = 3            # random controls that fine-tune or edit
    cf_steps: int = 20
    neutral_lines: int = 100
    eval_items: int = 120           # WinoBias / Winogender prompts per set
    # section 3: yes/no (questions per split; train prompts use 4 instructions, dev 2, test yn_test_instructions)
    yn_train: dict = field(default_factory=lambda: {"strategyqa": 24, "gsm8k": 12})
    yn_dev: dict = field(default_factory=lambda: {"strategyqa": 12, "gsm8k": 6})
    yn_test: dict = field(default_factory=lambda: {"strategyqa": 30, "gsm8k": 16})
    yn_test_instructions: int = 2
    nasa_steps: int = 16
    nasa_batch: int = 8
    # section 4: BBQ (items)
    bbq_check_items: int = 40
    bbq_train: int = 12
    bbq_dev: int = 12
    bbq_test: int = 24
    bbq_instructions: int = 2
    robust_items: int = 12
    n_boot: int = 1000


BUDGETS = {
    "full": Budget("full"),
    "quick": Budget("quick", locate_prompts=8, held_prompts=8, seeds=3, train_seeds=1, cf_steps=2, neutral_lines=20,
                    eval_items=12, yn_train={"strategyqa": 6, "gsm8k": 3}, yn_dev={"strategyqa": 3, "gsm8k": 2},
                    yn_test={"strategyqa": 6, "gsm8k": 3}, yn_test_instructions=1, nasa_steps=2, nasa_batch=4,
                    bbq_check_items=12, bbq_train=4, bbq_dev=4, bbq_test=6, bbq_instructions=1, robust_items=4, n_boot=200),
}


@dataclass
class Context:
    model: object
    stages: Stages
    budget: Budget
    data: Path
    neutral: list[str]
    cloze: list[dict]
    seed: int = 0
    progress: bool = True
    crispr_anyway: bool = False   # run CRISPR's steps where the model shows no bias too (a variant; plumbing tests)

    def stage(self, section: str, name: str, options: dict, compute):
        return self.stages.get(section, name, {"budget": self.budget.name, "seed": self.seed, **options}, compute)


# ---------------------------------------------------------------------------------------
# A section's result
# ---------------------------------------------------------------------------------------
@dataclass
class Section:
    key: str
    paper: str
    claim: str
    measured: str
    control: str
    checks: dict[str, bool]
    table: "object"                                   # the paper's markdown table (pandas)
    tables: dict = field(default_factory=dict)        # CSVs
    figures: list = field(default_factory=list)       # (title, plotly figure)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return verdict(self.checks)


def verdict(checks: dict[str, bool]) -> str:
    """holds when every check holds, does not hold when none does, partly otherwise (a check that could not be
    measured — None — counts as not holding)."""
    ok = [bool(v) for v in checks.values()]
    if ok and all(ok):
        return "holds"
    return "partly" if any(ok) else "does not hold"


def fmt(iv: Interval | dict, digits: int = 2) -> str:
    """'0.52 [0.41, 0.63]' (NaN: 'n/a')."""
    if isinstance(iv, dict):
        iv = Interval(**{k: iv[k] for k in ("estimate", "low", "high", "kind", "n") if k in iv})
    if not math.isfinite(iv.estimate):
        return "n/a"
    f = f"{{:+.{digits}f}}"
    return f"{f.format(iv.estimate)} [{f.format(iv.low)}, {f.format(iv.high)}]"


def iv_dict(iv: Interval) -> dict:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "kind": iv.kind, "n": iv.n}


def mean_iv(values, n_boot: int, seed: int = 0, groups=None) -> dict:
    v = np.asarray(values, dtype=float)
    return iv_dict(bootstrap(lambda i: v[i].mean(), len(v), n_boot=n_boot, seed=seed, groups=groups))


def write_figures(path: Path, title: str, figures: list) -> None:
    """Every figure of a section on one offline page (plotly.js included once)."""
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><h1>{title}</h1>"]
    for i, (name, fig) in enumerate(figures):
        parts.append(f"<h2>{name}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
