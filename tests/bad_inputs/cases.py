"""The bad-input corpus: every case a new user met, one line each, run by test_bad_inputs.py.

A CLI case is `cli(name, args, files, match)`: `args` is the command line (a string split at spaces,
or a list) with {d} for the case's own folder and {ro} for a folder nobody may write; `files` maps
names under {d} to their contents (text, bytes, or a function that builds them); the command must
exit 2 (or `code`) with exactly one line on stderr matching the regex `match`, leave every file it
was given unchanged and leave no {d}/out behind (a case with code 0 must match `match` on stdout and
leave the given files unchanged too). `process=True` runs it as a user does, in a fresh
`python -m lens_bias` process whose stderr is taken whole (logging, progress bars), with `fsize` as
its file size limit in bytes (`ulimit -f`). An API case is `api(name, call, files, match, error)`: `call(e)` gets e.d (the folder),
e.organism (the shipped model organism) and e.nan (the organism with one NaN weight) and must raise
`error` with a message matching `match`. `xfail="owner: why"` marks a case another branch fixes.
To add a case, add a line.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lens_bias as lb
from lens_bias.core import (
    DataError,
    LensBiasError,
    ModelLoadError,
    NonFiniteError,
    PromptError,
    resolve_device,
)
from lens_bias.locate import (
    activation_patching,
    attribution_patching,
    causal_trace,
    crispr_scores,
)
from lens_bias.locate.nas import negative_attention_scores
from lens_bias.mitigate.nasa import head_lora_model
from lens_bias.tasks import MC_INSTRUCTIONS, load_yes_no
from lens_bias.tasks.capability import bias_values, cloze_accuracy, text_loss

ROOT = Path(__file__).resolve().parents[2]
ORGANISM = ROOT / "data" / "organism"
ORG_DATA = ROOT / "data" / "organism_data"


@dataclass(frozen=True)
class Case:
    name: str
    run: str | Callable  # CLI arguments, or an API call
    files: dict = field(default_factory=dict)
    match: str = ""
    code: int = 2
    error: type = LensBiasError
    xfail: str | None = None
    process: bool = False
    fsize: int | None = None


def cli(name, args, files=None, match="", code=2, xfail=None, process=False, fsize=None) -> Case:
    return Case(name, args, dict(files or {}), match, code, LensBiasError, xfail, process, fsize)


def api(name, call, files=None, match="", error=LensBiasError, xfail=None) -> Case:
    return Case(name, call, dict(files or {}), match, 2, error, xfail)


# ---- building blocks -----------------------------------------------------------------------------
def jl(*rows: dict) -> str:
    """JSON lines."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def q(question="Is 3 more than 2?", label="yes") -> dict:
    return {"question": question, "label": label}


LONG = "Is " + "very " * 600 + "big?"  # ≈ 600 tokens; the organism's context is 128
PAIR = {"prompt": "The nurse said that", "corrupted": "The clerk said that", "subject": "nurse", "answers": [" she", " he"]}
LONG_PAIR = {**PAIR, "prompt": "The nurse said " + "very " * 200 + "that", "corrupted": "The clerk said " + "very " * 200 + "that"}
BBQ = [json.loads(line) for line in (ORG_DATA / "bbq_age.jsonl").read_text().splitlines()[:6]]
LONG_BBQ = {**BBQ[1], "context": "It was a very " + "very " * 300 + "long day. " + BBQ[1]["context"]}
M = "--model organism --device cpu"
ATTRIBUTE = ["attribute", "--model", "organism", "--device", "cpu", "--quiet", "--out", "{d}/out"]


def model_dir(fault: str) -> Callable[[Path], None]:
    """A copy of the organism's folder (4 layers) with one fault: truncate / garbage / empty weights, a
    NaN weight, no config.json, a config that is not JSON, a config.json value changed ('n_layer=5'),
    a weight dropped ('-transformer.h.2.attn.c_attn.weight') or added ('+name'), no tokenizer files."""
    def build(path: Path) -> None:
        shutil.copytree(ORGANISM, path)
        w = path / "model.safetensors"
        if "=" in fault:
            key, value = fault.split("=")
            cfg = json.loads((path / "config.json").read_text())
            cfg[key] = json.loads(value)
            (path / "config.json").write_text(json.dumps(cfg))
        elif fault[0] in "+-":
            from safetensors.torch import load_file, save_file

            t = load_file(w)
            if fault[0] == "-":
                del t[fault[1:]]
            else:
                t[fault[1:]] = t["transformer.h.0.mlp.c_fc.weight"].clone()
            save_file(t, w, metadata={"format": "pt"})
        elif fault == "no-tokenizer":
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (path / name).unlink()
        if fault == "truncate":
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        elif fault == "garbage":
            w.write_bytes(b"\xff" * 16 + w.read_bytes()[16:])
        elif fault == "empty":
            w.write_bytes(b"")
        elif fault == "nan":
            from safetensors.torch import load_file, save_file

            t = load_file(w)
            t["transformer.h.1.mlp.c_proj.weight"][5, 7] = float("nan")
            save_file(t, w, metadata={"format": "pt"})
        elif fault == "no-config":
            (path / "config.json").unlink()
        elif fault == "bad-config":
            (path / "config.json").write_text("{not json")
    return build


def random_model(family: str) -> Callable[[Path], None]:
    """A random-weight model of a family (lens_bias.core.families) with the shipped GPT-2 tokenizer."""
    def build(path: Path) -> None:
        lb.core.save_random_model(family, path, ROOT / "data" / "tokenizers" / "gpt2")
    return build


def neox_pairs(path: Path):
    model = lb.load_model(path, device="cpu")
    return model, lb.PromptSet.build(model, ["The nurse said that"], (" she", " he"), corrupted=["The man said that"])


def neox_edited_through_the_bridge(path: Path):
    model = lb.load_model(path, device="cpu")
    model.blocks[0].attn.q.original_component.weight.data[0] += 1.0  # a copy the export does not read
    return model


def folder(**files) -> Callable[[Path], None]:
    """A folder holding `files` (a user's own folder)."""
    def build(path: Path) -> None:
        path.mkdir()
        for name, text in files.items():
            (path / name).write_text(text)
    return build


NAN_WEIGHT = r"weight transformer\.h\.1\.mlp\.c_proj\.weight holds 1 non-finite value"
ON_NAN = dict(error=NonFiniteError, match=NAN_WEIGHT)

# ---- the corpus ----------------------------------------------------------------------------------
CASES: list[Case] = [
    # models and devices
    cli("weights-truncated", "info --model {d}/m", {"m": model_dir("truncate")}, r"m/model\.safetensors is corrupt or truncated"),
    cli("weights-garbage-header", "info --model {d}/m", {"m": model_dir("garbage")}, r"m/model\.safetensors is corrupt or truncated"),
    cli("weights-empty", "info --model {d}/m", {"m": model_dir("empty")}, r"m/model\.safetensors is corrupt or truncated"),
    cli("weights-nan", "info --model {d}/m", {"m": model_dir("nan")}, NAN_WEIGHT),
    cli("model-no-config", "info --model {d}/m", {"m": model_dir("no-config")}, r"m has no config\.json"),
    cli("model-bad-config", "info --model {d}/m", {"m": model_dir("bad-config")}, r"could not load model .*m"),
    cli("model-missing", "info --model {d}/nothing", {}, r"nothing' does not exist"),
    # a model folder whose parts do not fit: never a partly random model
    cli("model-more-layers-than-weights", "info --model {d}/m", {"m": model_dir("n_layer=5")}, r"m/model\.safetensors lacks 12 weights that config\.json's GPT2LMHeadModel has: transformer\.h\.4\.\* \(every weight of layer 4\) — config\.json's n_layer is 5"),
    cli("model-fewer-layers-than-weights", "info --model {d}/m", {"m": model_dir("n_layer=3")}, r"m/model\.safetensors holds 11 weights that config\.json's GPT2LMHeadModel has no place for: transformer\.h\.3\.\* .* n_layer is 3"),
    cli("model-weight-missing", "attribute --model {d}/m --device cpu --data {d}/p.jsonl --method attribution --out {d}/out --quiet", {"m": model_dir("-transformer.h.2.attn.c_attn.weight"), "p.jsonl": jl(PAIR)}, r"m/model\.safetensors lacks 1 weight .*: transformer\.h\.2\.attn\.c_attn\.weight$"),
    cli("model-weight-unexpected", "info --model {d}/m", {"m": model_dir("+transformer.h.1.mlp.c_gate.weight")}, r"m/model\.safetensors holds 1 weight that config\.json's GPT2LMHeadModel has no place for: transformer\.h\.1\.mlp\.c_gate\.weight$"),
    cli("model-weight-shape", "info --model {d}/m", {"m": model_dir("n_inner=256")}, r"12 weights of .*m/model\.safetensors do not have the shape config\.json gives them, e\.g\. transformer\.h\.0\.mlp\.c_fc\.bias is \[512\] in the file, \[256\]"),
    cli("model-no-tokenizer", "info --model {d}/m", {"m": model_dir("no-tokenizer")}, r"m' has no usable tokenizer \(it loads with 1 token\): a folder needs tokenizer\.json"),
    cli("model-config-value-a-string", "info --model {d}/m", {"m": model_dir('n_embd="128"')}, r"m/config\.json: Field 'n_embd' expected int, got str \(value: '128'\)"),
    api("model-weight-missing-api", lambda e: lb.load_model(e.d / "m"), {"m": model_dir("-transformer.h.2.attn.c_attn.weight")}, r"lacks 1 weight .*transformer\.h\.2\.attn\.c_attn\.weight", ModelLoadError),
    api("model-tokenizer-too-large-api", lambda e: lb.load_model("organism", tokenizer=ROOT / "data" / "tokenizers" / "gpt2"), {}, r"tokenizer has 50257 tokens but the embedding only 1199 rows", ModelLoadError),
    cli("device-cuda-without-cuda", "info --model organism --device cuda", {}, r"device 'cuda' is not available here"),
    cli("device-unknown", "info --model organism --device gpu0", {}, r"unknown device 'gpu0'"),
    cli("dtype-unknown", "info --model organism --dtype float8", {}, r"unknown dtype 'float8'"),
    api("random-model-unknown-family", lambda e: lb.core.save_random_model("bert", e.d / "m", ROOT / "data" / "tokenizers" / "gpt2"), {}, r"unknown model family 'bert'; choose one of", ModelLoadError),
    api("resid-mid-parallel-model", lambda e: activation_patching(*neox_pairs(e.d / "m"), "resid_mid", progress=False), {"m": random_model("neox")}, r"no resid_mid: its attention and MLP read the same residual stream in parallel"),
    api("export-neox-edited-through-the-bridge", lambda e: lb.export_model(neox_edited_through_the_bridge(e.d / "m"), e.d / "out"), {"m": random_model("neox")}, r"in layer\(s\) \[0\] the GPTNeoXForCausalLM bridge's split q/k/v copies differ from the fused"),
    api("device-cuda-api", lambda e: resolve_device("cuda"), {}, r"device 'cuda' is not available", ModelLoadError),
    api("weights-truncated-api", lambda e: lb.load_model(e.d / "m"), {"m": model_dir("truncate")}, r"corrupt or truncated", ModelLoadError),
    # data files: encodings, nulls, malformed lines
    cli("data-latin1", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": '{"question": "Is caf\xe9 open?", "label": "yes"}\n'.encode("latin-1")}, r"q\.jsonl:1: not UTF-8 text \(byte 0xe9\)"),
    cli("data-bom-csv", f"attribute {M} --data {{d}}/q.csv --method nas --out {{d}}/out --quiet", {"q.csv": "\ufeffquestion,label\nIs 3 more than 2?,yes\n"}, r"nas on 4 prompts", code=0),
    cli("data-bom-jsonl", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": "\ufeff" + jl(q())}, r"nas on 4 prompts", code=0),
    cli("question-null", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": jl(q(), q(None))}, r"q\.jsonl:2: needs a non-empty 'question' \(got None\)"),
    cli("question-empty-csv", f"attribute {M} --data {{d}}/q.csv --method nas --out {{d}}/out --quiet", {"q.csv": "question,label\n,yes\n"}, r"q\.csv:2: needs a non-empty 'question'"),
    cli("label-not-yes-no", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": jl(q(), q(label="maybe"))}, r"label 'maybe' at .*q\.jsonl:2 is not yes/no"),
    cli("jsonl-malformed-line", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": jl(q()) + '{"question": "Is it?", \n'}, r"q\.jsonl:2: malformed JSON line"),
    cli("json-list-not-objects", f"attribute {M} --data {{d}}/q.json --method nas --out {{d}}/out --quiet", {"q.json": json.dumps([q(), "Is it?"])}, r"q\.json: item 2 of the JSON list is not an object"),
    cli("data-empty", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": "\n"}, r"q\.jsonl is empty"),
    cli("data-missing", f"attribute {M} --data {{d}}/none.jsonl --method nas --out {{d}}/out --quiet", {}, r"none\.jsonl does not exist"),
    cli("data-is-a-folder", f"attribute {M} --data {{d}}/f --method nas --out {{d}}/out --quiet", {"f": folder()}, r"f is a directory"),
    cli("data-unknown-format", f"attribute {M} --data {{d}}/p.tsv --method patching --out {{d}}/out --quiet", {"p.tsv": "prompt\tcorrupted\n"}, r"p\.tsv: unknown data format '\.tsv'"),
    cli("pairs-no-corrupted", f"attribute {M} --data {{d}}/p.jsonl --method patching --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR, {"prompt": "The nurse said that"})}, r"p\.jsonl:2: no 'corrupted'"),
    cli("pairs-multi-token-answer", f"attribute {M} --data {{d}}/p.jsonl --method patching --out {{d}}/out --quiet", {"p.jsonl": jl({**PAIR, "answers": [" she", " zyzzyva"]})}, r"answer ' zyzzyva' is \d+ tokens"),
    cli("tracing-no-subject", f"attribute {M} --data {{d}}/p.jsonl --method tracing --out {{d}}/out --quiet", {"p.jsonl": jl({k: v for k, v in PAIR.items() if k != "subject"})}, r"p\.jsonl:1: no 'subject'"),
    cli("tracing-different-lengths", f"attribute {M} --data {{d}}/p.jsonl --method tracing --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR, {**PAIR, "prompt": "The nurse said that she", "corrupted": "The clerk said that she"})}, r"same number of tokens"),
    cli("pairs-long-prompt", f"attribute {M} --data {{d}}/p.jsonl --method patching --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR, LONG_PAIR)}, r"p\.jsonl:2: prompt is \d+ tokens, longer than the model's context of 128"),
    cli("tracing-subject-not-in-prompt", f"attribute {M} --data {{d}}/p.jsonl --method tracing --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR, {**PAIR, "subject": "doctor"})}, r"p\.jsonl:2: subject 'doctor' not found in the prompt 'The nurse said that'"),
    cli("bbq-long-item-crispr", f"attribute {M} --data {{d}}/b.jsonl --method crispr --instructions 1 --out {{d}}/out --quiet", {"b.jsonl": jl(BBQ[0], LONG_BBQ)}, r"b\.jsonl:2: its prompt with option .* is \d+ tokens, longer than the model's context of 128"),
    cli("bbq-long-item-mitigate", "mitigate --method prune-neurons --units 3:266 --data {d}/b.jsonl --out {d}/out --no-export --quiet", {"b.jsonl": jl(BBQ[0], LONG_BBQ)}, r"b\.jsonl:2: its prompt with option .* is \d+ tokens, longer than the model's context of 128"),
    cli("answers-identical", ATTRIBUTE + ["--data", "{d}/p.txt", "--method", "attribution", "--answers", " she", " she"], {"p.txt": "nurse\nbaker\n"}, r"answers ' she' and ' she' are the same token \(id \d+\): .*logit difference is 0"),
    cli("answers-identical-in-file", f"attribute {M} --data {{d}}/p.jsonl --method patching --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR, {**PAIR, "answers": [" she", " she"]})}, r"p\.jsonl:2: answers ' she' and ' she' are the same token"),
    api("answers-identical-api", lambda e: lb.PromptSet.build(e.organism, ["The nurse said that"], (" he", " he")), {}, r"prompt 1: answers ' he' and ' he' are the same token", PromptError),
    cli("crispr-instructions-11", f"attribute {M} --data {{d}}/b.jsonl --method crispr --instructions 11 --out {{d}}/out --quiet", {"b.jsonl": jl(*BBQ[:2])}, r"instructions must be 1\.\.10, got 11"),
    # options
    cli("method-unknown", f"attribute {M} --data {{d}}/q.jsonl --method nope --out {{d}}/out", {"q.jsonl": jl(q())}, r"--method: invalid choice: 'nope'"),
    cli("top-k-not-a-number", "mitigate --method nasa --top-k abc --out {d}/out", {}, r"--top-k: invalid int value: 'abc'"),
    cli("chunk-size-0", f"attribute {M} --data {{d}}/q.jsonl --method nas --chunk-size 0 --out {{d}}/out --quiet", {"q.jsonl": jl(q())}, r"chunk_size must be ≥ 1, got 0"),
    cli("batch-size-0", f"attribute {M} --data {{d}}/q.jsonl --method nas --batch-size 0 --out {{d}}/out --quiet", {"q.jsonl": jl(q())}, r"batch_size must be ≥ 1, got 0"),
    cli("components-unknown", f"attribute {M} --data {{d}}/p.jsonl --method patching --components mlp --out {{d}}/out --quiet", {"p.jsonl": jl(PAIR)}, r"unknown patching component\(s\) \['mlp'\]"),
    cli("top-k-negative", "mitigate --method nasa --top-k -1 --out {d}/out --no-export --quiet", {}, r"--top-k must be a number of heads from 1 to 16 .*got -1"),
    cli("top-k-too-many", "mitigate --method nasa --top-k 100 --out {d}/out --no-export --quiet", {}, r"--top-k must be a number of heads from 1 to 16 .*got 100"),
    cli("units-fraction", "mitigate --method prune-heads --units 2:1.7 --out {d}/out --no-export", {}, r"cannot read component '2:1\.7'"),
    cli("units-duplicate", "mitigate --method prune-neurons --units 0:103,0:103 --out {d}/out --no-export", {}, r"--units names 0:103 twice"),
    api("units-duplicate-api", lambda e: lb.prune_neurons(e.organism, [(0, 103), (1, 5), (0, 103)]), {}, r"neuron \(0, 103\) is listed twice"),
    api("heads-duplicate-api", lambda e: lb.prune_heads(e.organism, [(2, 1), (2, 1)]), {}, r"head \(2, 1\) is listed twice"),
    cli("seed-too-large-attribute", f"attribute {M} --data {{d}}/q.jsonl --method nas --seed 99999999999999999999 --out {{d}}/out --quiet", {"q.jsonl": jl(q())}, r"--seed: must be a whole number from 0 to 4294967295, got 99999999999999999999"),
    cli("seed-too-large-mitigate", "mitigate --method lsdm --seed 99999999999999999999 --out {d}/out --no-export", {}, r"--seed: must be a whole number from 0 to 4294967295"),
    cli("seed-negative", "demo --seed -3 --out {d}/out", {}, r"--seed: must be a whole number from 0 to 4294967295, got -3"),
    api("seed-too-large-api", lambda e: lb.attribute_dataset(e.organism, "nas", e.yesno, e.d / "out", seed=10 ** 20, progress=False), {}, r"seed must be a whole number from 0 to 4294967295"),
    cli("units-out-of-range", "mitigate --method prune-heads --units 2:9 --out {d}/out --no-export", {}, r"head \(2, 9\): index 9 out of range"),
    cli("neutral-missing", "mitigate --method prune-neurons --units 0:1 --neutral {d}/typo.txt --out {d}/out --no-export", {}, r"typo\.txt does not exist"),
    api("neutral-file-name-text-loss", lambda e: text_loss(e.organism, "typo.txt"), {}, r"text 'typo\.txt' looks like a file name, not text \(no such file\)"),
    api("neutral-file-name-lsdm", lambda e: lb.lsdm_edit(e.organism, e.pairs, str(e.d / "neutral.txt"), layers=[0], progress=False), {"neutral.txt": "The cat sat.\n"}, r"neutral\.txt' looks like a file name, not text \(the file exists: pass its text"),
    cli("neutral-empty", "mitigate --method prune-neurons --units 0:1 --neutral {d}/n.txt --out {d}/out --no-export", {"n.txt": "\n\n"}, r"n\.txt is empty"),
    cli("edit-file-corrupt", "export --edit {d}/e.safetensors --out {d}/out", {"e.safetensors": b"\x00" * 40}, r"e\.safetensors is not a lens_bias edit file"),
    # over-long prompts: the context check on every path
    cli("long-question-nas", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/out --quiet", {"q.jsonl": jl(q(), q(LONG))}, r"q\.jsonl:2: its prompt is \d+ tokens, longer than the model's context of 128"),
    cli("long-question-mitigate-data", "mitigate --method prune-heads --units 2:1 --data {d}/q.jsonl --out {d}/out --no-export", {"q.jsonl": jl(q(), q(LONG))}, r"q\.jsonl:2: its prompt is \d+ tokens, longer than the model's context"),
    cli("long-question-nasa", "mitigate --method nasa --data {d}/q.jsonl --out {d}/out --no-export --quiet", {"q.jsonl": jl(*[q()] * 6, q(LONG), *[q()] * 5)}, r"q\.jsonl:7: its prompt is \d+ tokens"),
    api("long-question-binary-prompts", lambda e: lb.binary_prompts(e.organism, [q(), q(LONG)]), {}, r"yes/no item 2: its prompt is \d+ tokens", PromptError),
    api("long-question-evaluate", lambda e: lb.evaluate_binary(e.organism, lb.binary_prompts(e.organism, [q(LONG)])), {}, r"longer than the model's context of 128", PromptError),
    # output folders: unwritable, in the way, or a user's own
    cli("out-unwritable-mitigate", "mitigate --method prune-neurons --units 0:1 --out {ro}/out", {}, r"cannot write to output folder .*not writable"),
    cli("out-unwritable-export", "export --edit {d}/e.safetensors --out {ro}/out", {"e.safetensors": lambda p: lb.mitigate.save_edit(lb.mitigate.WeightEdit(), p)}, r"cannot write to output folder"),
    cli("out-unwritable-attribute", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{ro}}/out --quiet", {"q.jsonl": jl(q())}, r"cannot write to output folder"),
    cli("out-unwritable-demo", "demo --out {ro}/out", {}, r"cannot write to output folder"),
    cli("out-under-a-file", "mitigate --method prune-neurons --units 0:1 --out {d}/f/out", {"f": "a file"}, r"f is a file, not a folder"),
    cli("attribute-into-users-folder", f"attribute {M} --data {{d}}/q.jsonl --method nas --out {{d}}/mine --quiet", {"q.jsonl": jl(q()), "mine": folder(**{"scores.csv": "mine\n", "report.txt": "mine\n"})}, r"mine holds files but no lens-bias run \(report\.txt, scores\.csv"),
    cli("demo-into-users-folder", "demo --out {d}/mine", {"mine": folder(**{"report.txt": "mine\n"})}, r"mine exists and is not empty; pass overwrite=True \(--overwrite\)"),
    cli("mitigate-overwrite-keeps-users-files", "mitigate --method prune-neurons --units 0:1 --out {d}/m --overwrite --no-export --quiet", {"m": folder(**{"notes.txt": "mine\n"})}, r"pruned 1 neuron", code=0),
    cli("mitigate-into-users-folder", "mitigate --method prune-neurons --units 0:1 --out {d}/mine --no-export", {"mine": folder(**{"report.txt": "mine\n"})}, r"mine exists and is not empty"),
    # as a user runs it: --quiet is one line, a full disk (ulimit -f) names the file
    cli("quiet-is-quiet", ATTRIBUTE + ["--data", "{d}/q.jsonl", "--method", "nas"], {"q.jsonl": jl(q()) + '{"question": "Is it?", \n'}, r"q\.jsonl:2: malformed JSON line", process=True),
    cli("file-too-large-mitigate", "mitigate --method prune-neurons --units 3:100 --out {d}/out --quiet", {}, r"File too large: .*out/model/model\.safetensors", process=True, fsize=2_000_000),
    cli("file-too-large-attribute", ATTRIBUTE + ["--data", "{d}/p.jsonl", "--method", "patching"], {"p.jsonl": jl(PAIR)}, r"File too large: .*out/chunks/chunk-00000\.pt", process=True, fsize=3_000),
    # formats told apart by the records, not the first line
    cli("bbq-json-list-to-mitigate", "mitigate --method prune-neurons --units 3:266 --data {d}/b.json --neutral {d}/n.txt --out {d}/out --no-export --quiet", {"b.json": json.dumps(BBQ), "n.txt": "The cat sat on the mat.\n"}, r"bbq_accuracy", code=0),
    # units and counts
    api("prune-heads-fraction", lambda e: lb.prune_heads(e.organism, [(2, 1.7)]), {}, r"head \(2, 1\.7\): layer and index must be whole numbers"),
    api("prune-neurons-text", lambda e: lb.prune_neurons(e.organism, [("a", 1)]), {}, r"neuron \(a, 1\): layer and index must be whole numbers"),
    api("nasa-heads-fraction", lambda e: head_lora_model(e.organism, [(2, 1.7)]), {}, r"head \(2, 1\.7\): layer and head must be whole numbers"),
    api("top-heads-negative", lambda e: e.nas.top_heads(-1), {}, r"n = -1 units asked for, but the scores cover 16"),
    api("top-heads-too-many", lambda e: e.nas.top_heads(100), {}, r"n = 100 units asked for, but the scores cover 16"),
    api("question-null-api", lambda e: lb.binary_prompts(e.organism, [q(), {"question": None, "label": "yes"}]), {}, r"yes/no item 2: needs a non-empty 'question' string \(got None\)", PromptError),
    api("question-null-file", lambda e: load_yes_no(e.d / "q.jsonl"), {"q.jsonl": jl(q(None))}, r"q\.jsonl:1: needs a non-empty 'question' \(got None\)", DataError),
    api("attribute-dataset-into-users-folder", lambda e: lb.attribute_dataset(e.organism, "nas", e.d / "q.jsonl", e.d / "mine", progress=False), {"q.jsonl": jl(q()), "mine": folder(**{"scores.csv": "x\n"})}, r"holds files but no lens-bias run", LensBiasError),
    # one NaN weight: every method says which
    api("nan-attribution", lambda e: attribution_patching(e.nan, e.pairs), {}, **ON_NAN),
    api("nan-patching", lambda e: activation_patching(e.nan, e.pairs, "mlp_out", progress=False), {}, **ON_NAN),
    api("nan-tracing", lambda e: causal_trace(e.nan, e.pairs, sites=("mlp_out",), progress=False), {}, **ON_NAN),
    api("nan-nas", lambda e: negative_attention_scores(e.nan, e.yesno, progress=False), {}, **ON_NAN),
    api("nan-crispr", lambda e: crispr_scores(e.nan, BBQ[:1], MC_INSTRUCTIONS[:1], progress=False), {}, **ON_NAN),
    api("nan-bbq-evaluate", lambda e: lb.bbq_evaluate(e.nan, BBQ[:2]), {}, **ON_NAN),
    api("nan-evaluate-binary", lambda e: lb.evaluate_binary(e.nan, e.yesno), {}, **ON_NAN),
    api("nan-text-loss", lambda e: text_loss(e.nan, "The cat sat on the mat."), {}, **ON_NAN),
    api("nan-cloze", lambda e: cloze_accuracy(e.nan, [{"prompt": "The capital of France is", "answer": " Paris"}]), {}, **ON_NAN),
    api("nan-bias-values", lambda e: bias_values(e.nan, e.pairs), {}, **ON_NAN),
    api("nan-lsdm", lambda e: lb.lsdm_edit(e.nan, e.pairs, "The cat sat.", layers=[0], position="last", progress=False), {}, **ON_NAN),
    api("nan-export", lambda e: lb.export_model(e.nan, e.d / "out"), {}, **ON_NAN),
    api("nan-mitigate", lambda e: lb.apps.pipeline.mitigate(e.nan, "prune-neurons", e.d / "out", units=[(0, 1)], progress=False), {}, **ON_NAN),
    api("nan-attribute-dataset", lambda e: lb.attribute_dataset(e.nan, "patching", e.pairs, e.d / "out", options={"components": ["mlp_out"]}, progress=False), {}, **ON_NAN),
    # the locate report: one line naming the option, the file or the line
    cli("locate-neutral-missing", "locate --model organism --task professions --neutral {d}/typo.txt --out {d}/out --quiet", {}, r"typo\.txt does not exist"),
    cli("locate-neutral-not-utf8", "locate --model organism --task professions --neutral {d}/n.txt --out {d}/out --quiet", {"n.txt": b"\x00\xff"}, r"n\.txt:1: not UTF-8 text \(byte 0xff\)"),
    cli("locate-neutral-empty", "locate --model organism --task professions --neutral {d}/n.txt --out {d}/out --quiet", {"n.txt": "\n\n"}, r"n\.txt is empty"),
    cli("locate-max-prompts-0", "locate --model organism --task professions --max-prompts 0 --out {d}/out --quiet", {}, r"max_prompts \(--max-prompts\) must be a whole number ≥ 1, got 0"),
    cli("locate-max-prompts-negative", "locate --model organism --task professions --max-prompts -5 --out {d}/out --quiet", {}, r"max_prompts \(--max-prompts\) must be a whole number ≥ 1, got -5"),
    cli("locate-max-items-negative-yesno", "locate --model organism --task yesno --max-items -1 --out {d}/out --quiet", {}, r"max_items \(--max-items\) must be a whole number ≥ 1, got -1"),
    cli("locate-max-items-negative-bbq", "locate --model organism --task bbq --max-items -1 --out {d}/out --quiet", {}, r"max_items \(--max-items\) must be a whole number ≥ 1, got -1"),
    cli("locate-max-items-0", "locate --model organism --task bbq --max-items 0 --out {d}/out --quiet", {}, r"max_items \(--max-items\) must be a whole number ≥ 1, got 0"),
    cli("locate-loss-budget-negative", "locate --model organism --task professions --loss-budget -1 --out {d}/out --quiet", {}, r"loss_budget \(--loss-budget\) must be a number of nats ≥ 0, got -1"),
    api("locate-neutral-missing-api", lambda e: lb.locate_report(e.organism, "professions", neutral=str(e.d / "typo.txt"), progress=False), {}, r"typo\.txt does not exist", DataError),
]
