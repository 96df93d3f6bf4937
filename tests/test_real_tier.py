"""The real-model tier's gate (tests/real): on a machine without SmolLM2-135M-Instruct its tests skip with one line
naming the command that gets it, and under CI (the environment variable CI set) they fail instead — CI fetches the
model and must not skip the tier. Run here in a subprocess with the model hidden: an empty cache and no package."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_TEST = "tests/real/test_real_loading.py::test_prompts_are_tokenised_as_the_model_tokenises_them"


def _run_without_the_model(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    plugin = tmp_path / "hide_real_model.py"
    plugin.write_text("import lens_bias.core.model_names as names\n\nnames.package_file = lambda entry: None\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"LENS_BIAS_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), **({"CI": "true"} if ci else {})})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
                           "hide_real_model", ONE_TEST], cwd=ROOT, env=env, capture_output=True, text=True)


def test_without_the_model_the_tier_skips_and_says_how_to_get_it(tmp_path):
    r = _run_without_the_model(tmp_path, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "`lens-bias fetch smollm2-135m-instruct`" in skipped[0]


def test_under_ci_the_tier_fails_instead_of_skipping(tmp_path):
    r = _run_without_the_model(tmp_path, ci=True)
    assert r.returncode == 1 and "ERROR at setup" in r.stdout, r.stdout + r.stderr
    assert "lens-bias fetch smollm2-135m-instruct" in r.stdout and "must run, not skip" in r.stdout
