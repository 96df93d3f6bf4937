"""export: edited bridge → Hugging Face directory → transformers reproduces the logits; weight-edit files."""

import pytest
import torch

from lens_bias.core import (
    LensBiasError,
    clone_model,
    hf_state_dict,
    load_model,
    save_random_model,
)
from lens_bias.mitigate import (
    apply_edit,
    export_model,
    load_edit,
    prune_neurons,
    save_edit,
    verify_export,
    weight_edit,
)

IDS = torch.tensor([[50, 312, 77, 1024, 5, 901, 33], [7, 8, 9, 10, 11, 12, 13]])


def _reloaded_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


def _attn_edit(model):
    """Change one head's query weights in the fused/split attention projection (in place)."""
    sd = hf_state_dict(model)
    name = next(k for k in sd if k.endswith(("attn.c_attn.weight", "q_proj.weight", "query_key_value.weight"))
                and ".0." in k)
    with torch.no_grad():
        sd[name][:8, :8] += 0.5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_export_reload_equal_logits(family, tmp_path, gpt2_tokenizer_dir):
    path = save_random_model(family, tmp_path / "base", gpt2_tokenizer_dir, seed=3, n_kv_heads=2)
    model = load_model(path, device="cpu")
    edited = prune_neurons(model, [(0, 5), (1, 17)]).model
    _attn_edit(edited)
    out = export_model(edited, tmp_path / "edited")
    with torch.no_grad():
        ours, orig = edited(IDS), model(IDS)
    theirs = _reloaded_logits(out, IDS)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (orig - theirs).abs().max().item() > 1e-3  # the edit is really in the export
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_clone_is_independent_and_keeps_fused_views(organism):
    # copy.deepcopy would split GPT-2's q/k/v views from c_attn: an edit of c_attn would not reach forward
    clone = clone_model(organism)
    with torch.no_grad():
        before = organism(IDS % 1000)
        assert torch.equal(clone(IDS % 1000), before)
        hf_state_dict(clone)["transformer.h.1.attn.c_attn.weight"][:, 256:272] += 1.0  # head 0's values
        assert (clone(IDS % 1000) - before).abs().max() > 1e-3
        assert torch.equal(organism(IDS % 1000), before)


def test_refuses_nonempty_dir_and_overwrites_atomically(tiny_gpt2, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(LensBiasError, match="not empty"):
        export_model(tiny_gpt2, out)
    assert (out / "keep.txt").exists()
    # a failure while writing leaves the old directory as it was and no temp directory
    import lens_bias.mitigate.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "verify_export", boom)
    with pytest.raises(RuntimeError):
        export_model(tiny_gpt2, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").exists()
    monkeypatch.undo()
    export_model(tiny_gpt2, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # an empty existing directory is fine
    (tmp_path / "empty").mkdir()
    export_model(tiny_gpt2, tmp_path / "empty", verify=False)


def test_unsupported_architecture_is_refused(tmp_path, gpt2_tokenizer_dir):
    """An encoder-decoder is refused; every decoder family's round trip: tests/core/test_families.py."""
    model = load_model(save_random_model("t5", tmp_path / "t5", gpt2_tokenizer_dir), device="cpu")
    with pytest.raises(LensBiasError, match="not supported.*GPT2LMHeadModel"):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_export_catches_a_mismatch(tiny_gpt2, tmp_path):
    out = export_model(tiny_gpt2, tmp_path / "a")
    edited = prune_neurons(tiny_gpt2, [(0, 1), (0, 2), (1, 3)]).model
    with pytest.raises(LensBiasError, match="differ"):
        verify_export(edited, out)


def test_edit_file_roundtrip_and_reapply(tiny_llama, tmp_path):
    neurons = [(0, 4), (1, 9)]
    pruned = prune_neurons(tiny_llama, neurons).model
    _attn_edit(pruned)
    edit = weight_edit(tiny_llama, pruned, meta={"method": "prune", "neurons": neurons})
    table = edit.to_frame()
    assert set(table["parameter"]) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                       "model.layers.0.self_attn.q_proj.weight"}
    assert table.set_index("parameter").loc["model.layers.0.mlp.down_proj.weight", "n_changed"] == 1
    path = save_edit(edit, tmp_path / "prune.safetensors")
    assert path.stat().st_size < 20_000  # slices, not whole matrices
    loaded = load_edit(path)
    assert loaded.meta["neurons"] == [list(n) for n in neurons] and abs(loaded.norm - edit.norm) < 1e-6
    again = apply_edit(tiny_llama, loaded)
    with torch.no_grad():
        assert torch.equal(again(IDS), pruned(IDS))
        assert not torch.equal(tiny_llama(IDS), pruned(IDS))  # the original is untouched


def test_edit_refuses_another_base_model(tiny_gpt2, tmp_path, gpt2_tokenizer_dir):
    edit = weight_edit(tiny_gpt2, prune_neurons(tiny_gpt2, [(0, 3)]).model)
    other = load_model(save_random_model("gpt2", tmp_path / "other", gpt2_tokenizer_dir, seed=9), device="cpu")
    with pytest.raises(LensBiasError, match="differs from the model the edit was made on"):
        apply_edit(other, edit)
    with pytest.raises(LensBiasError, match="not a lens_bias edit file"):
        (tmp_path / "bad.safetensors").write_bytes(b"garbage")
        load_edit(tmp_path / "bad.safetensors")


def test_edit_applies_across_dtypes_and_refuses_other_sizes(tiny_llama_dir, tmp_path, gpt2_tokenizer_dir):
    m32 = load_model(tiny_llama_dir, device="cpu")
    edit = weight_edit(m32, prune_neurons(m32, [(0, 5), (1, 7)]).model)
    m16 = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    again = apply_edit(m16, edit)  # the same base weights, rounded: accepted
    w = hf_state_dict(again)["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16 and torch.all(w[:, 5] == 0)
    small = load_model(save_random_model("llama", tmp_path / "small", gpt2_tokenizer_dir, d_mlp=4, n_kv_heads=2),
                       device="cpu")
    with pytest.raises(LensBiasError, match="does not fit this model's weight of shape"):
        apply_edit(small, edit, check=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_is_checked_against_transformers_own_computation(organism, dtype, tmp_path):
    """issue 22: a bfloat16 export was refused on a 30-layer model because the reload ran transformers'
    sdpa attention and the bridge eager (2.5 apart on SmolLM2 in bf16 for the same weights). The check
    reloads with the bridge's attention and compares the weights bit for bit: the pruned organism's
    export matches exactly; the two attention kernels on the same weights stay within logit_tolerance
    (4·u·√(2L)·max|logit|: the margin it is derived with); a changed weight is named."""
    from transformers import AutoModelForCausalLM

    from lens_bias.core.hf import probe_tokens
    from lens_bias.core.precision import logit_tolerance

    model = load_model("organism", device="cpu", dtype=dtype)
    pruned = prune_neurons(model, [(0, 103)]).model
    out = export_model(pruned, tmp_path / "m")
    # the same weights and kernels: equal, up to one unit in the last place of the largest logit (≤ 16)
    assert verify_export(pruned, out) <= torch.finfo(getattr(torch, dtype)).eps * 16
    tokens = probe_tokens(pruned)
    with torch.no_grad():
        logits = {a: AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype), attn_implementation=a,
                                                          output_attentions=False).eval()(tokens).logits.float()
                  for a in ("eager", "sdpa")}
    kernels = float((logits["eager"] - logits["sdpa"]).abs().max())
    # the factor 4 in the tolerance keeps a margin of 2 over what two kernels differ by
    assert kernels <= logit_tolerance(getattr(torch, dtype), logits["eager"], model.cfg.n_layers) / 2
    with pytest.raises(LensBiasError, match=r"exported weight transformer\.h\.0\.mlp\.c_proj\.weight has other values"):
        verify_export(model, out)  # the unedited model against the pruned export
