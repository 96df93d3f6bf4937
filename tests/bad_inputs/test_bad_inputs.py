"""Every case of the bad-input corpus (cases.py): the CLI exits 2 with one line on stderr naming the
problem and the file/line/item, touches none of the files it was given and leaves no output folder;
the API raises a LensBiasError saying the same."""

import importlib.util
import os
import re
import resource
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_spec = importlib.util.spec_from_file_location("lens_bias_bad_input_cases", Path(__file__).with_name("cases.py"))
cases = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

PROGRESS = re.compile(r"(\d+%\|)|(it/s\])|(s/it\])")  # tqdm bars share stderr with the error line


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory):
    """A folder this process cannot write to (a read-only mode, or /sys when running as root)."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        d = tmp_path_factory.mktemp("ro")
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield d
        d.chmod(stat.S_IRWXU)
        return
    for d in (Path("/sys"), Path("/proc/sys")):
        try:
            fd, p = tempfile.mkstemp(dir=d)
        except OSError:
            yield d
            return
        os.close(fd)
        os.unlink(p)
    pytest.skip("no unwritable folder on this machine")


@pytest.fixture(scope="module")
def env(organism, organism_card):
    """What API cases use: the organism, the organism with one NaN weight, prompt sets, a NAS result."""
    from lens_bias.apps.demo import gender_pairs
    from lens_bias.core import load_model
    from lens_bias.core.hf import hf_state_dict
    from lens_bias.locate.nas import negative_attention_scores
    from lens_bias.organism import data_path

    nan = load_model("organism", device="cpu")
    with torch.no_grad():
        hf_state_dict(nan)["transformer.h.1.mlp.c_proj.weight"][5, 7] = float("nan")
    pairs = gender_pairs(organism, organism_card)
    pairs = pairs[[i for i, p in enumerate(pairs.prompts) if p.endswith("said that")]][:6]
    yesno = cases.lb.binary_prompts(organism, cases.load_yes_no(data_path("yesno"))[:4])
    return SimpleNamespace(organism=organism, nan=nan, pairs=pairs, yesno=yesno,
                           nas=negative_attention_scores(organism, yesno, progress=False))


@pytest.fixture
def cached_models(monkeypatch):
    """The CLI loads the shipped organism once for all cases (faults live in copies under {d})."""
    from lens_bias.apps import cli, demo
    from lens_bias.core import models
    from lens_bias.runs import dataset

    real, cache = models.load_model, {}

    def load(name, device=None, dtype=None, **kw):
        if str(name) != "organism" or kw:
            return real(name, device=device, dtype=dtype, **kw)
        key = (str(device), str(dtype))
        if key not in cache:
            cache[key] = real(name, device=device, dtype=dtype)
        return cache[key]

    for module in (cli, demo, dataset):
        monkeypatch.setattr(module, "load_model", load)


def _make(d: Path, files: dict) -> dict[Path, bytes]:
    """Create a case's files; return every file's bytes, to check later that none changed."""
    for name, content in files.items():
        path = d / name
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", cases.CASES, ids=[c.name for c in cases.CASES])
def test_bad_input(case, tmp_path, request, capsys):
    if case.xfail:
        request.applymarker(pytest.mark.xfail(reason=case.xfail, strict=True))
    d = tmp_path / "case"
    d.mkdir()
    given = _make(d, case.files)
    if callable(case.run):
        e = request.getfixturevalue("env")
        e.d = d
        with pytest.raises(case.error) as info:
            case.run(e)
        assert re.search(case.match, str(info.value)), str(info.value)
        return
    words = case.run.split() if isinstance(case.run, str) else list(case.run)
    ro = request.getfixturevalue("unwritable") if any("{ro}" in w for w in words) else None
    args = [w.format(d=d, ro=ro) for w in words]
    code, out, err = (_in_process(args, request, capsys) if not case.process else _in_a_process(args, case.fsize))
    shown = err if case.process and "--quiet" in args else "\n".join(l for l in err.splitlines() if not PROGRESS.search(l))
    lines = [line for line in shown.splitlines() if line.strip()]
    assert {p: p.read_bytes() for p in given} == given  # nothing the user gave is changed
    if case.code != 0:
        assert code == case.code, err
        assert len(lines) == 1 and lines[0].startswith("lens-bias: error: "), err
        assert re.search(case.match, lines[0]), lines[0]
        assert "Traceback" not in err
        # nothing half-made is left
        assert not (d / "out").exists()
        assert not [p for p in d.iterdir() if p.name.startswith(".")]
    else:
        assert code == 0, err
        assert re.search(case.match, out), out


def _in_process(args: list[str], request, capsys) -> tuple[int, str, str]:
    """main(args) in this process (the shipped organism loaded once for all cases)."""
    request.getfixturevalue("cached_models")
    from lens_bias.apps.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _in_a_process(args: list[str], fsize: int | None) -> tuple[int, str, str]:
    """`python -m lens_bias args` as a user runs it: stderr whole (logging handlers, progress bars
    included); `fsize` is the file size limit in bytes (`ulimit -f`)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # as a user has it (conftest quiets transformers for the suite)
    r = subprocess.run([sys.executable, "-m", "lens_bias", *args], capture_output=True, text=True, env=env,
                       preexec_fn=limit if fsize else None, timeout=600)
    return r.returncode, r.stdout, r.stderr
