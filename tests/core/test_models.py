"""load_model: shipped organism, local HF directories of real families, clear errors."""

import pytest
import torch

from lens_bias.core import ModelLoadError, load_model, resolve_dtype, save_random_model


def _hf_logits(path, ids, seq2seq=False):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    hf = cls.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        if seq2seq:
            return hf(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_random_family_logits_equal_transformers(family, tmp_path, gpt2_tokenizer_dir):
    path = save_random_model(family, tmp_path / family, gpt2_tokenizer_dir, seed=1, n_kv_heads=2)
    model = load_model(path, device="cpu")
    ids = model.tokenizer(["The nurse said that she", "The engineer said he was"], return_tensors="pt",
                          padding=True).input_ids
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, ids.shape[1], len(model.tokenizer))
    assert (ours - _hf_logits(path, ids)).abs().max().item() <= 1e-4
    if family == "llama":
        assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4


def test_t5_logits_equal_transformers(tmp_path, gpt2_tokenizer_dir):
    path = save_random_model("t5", tmp_path / "t5", gpt2_tokenizer_dir, seed=1)
    model = load_model(path, device="cpu")
    ids = model.tokenizer(["The nurse said that she"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids, decoder_input=ids[:, :3])
    assert (ours - _hf_logits(path, ids, seq2seq=True)).abs().max().item() <= 1e-4


def test_organism_logits_equal_transformers(organism):
    from lens_bias.core import shipped_model_dir

    ids = torch.tensor([[organism.tokenizer.bos_token_id] + organism.tokenizer("The nurse said that")["input_ids"]])
    with torch.no_grad():
        ours = organism(ids)
    assert (ours - _hf_logits(shipped_model_dir("organism"), ids)).abs().max().item() <= 1e-4
    assert not organism.training


def test_hooks_and_cache_names(tiny_gpt2):
    ids = torch.tensor([[464, 15849, 531, 326]])
    _, cache = tiny_gpt2.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_z", "hook_post")))
    assert set(cache.keys()) == {f"blocks.{l}.{h}" for l in range(2) for h in ("attn.hook_z", "mlp.hook_post")}
    assert cache["blocks.0.attn.hook_z"].shape == (1, 4, 4, 16)


def test_dtype_argument(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype("fp32") == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float7")


def test_unknown_name_offline_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    msg = str(err.value)
    assert "not a shipped model" in msg and "local directory" in msg and "load_model('/path" in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope" / "model", device="cpu")
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(f, device="cpu")


def test_unknown_family():
    with pytest.raises(ModelLoadError, match="unknown model family"):
        save_random_model("bert", "/tmp/x", "/tmp/y")
