"""Loading SmolLM2-135M-Instruct by name: the converted copy is transformers' own GGUF read of the package's file,
the hooked model gives plain transformers' logits (plain and chat prompts, padded batches), prompts are tokenised
as the model's tokenizer tokenises them (no chat-turn marker prepended as BOS), and a known real bias is there."""

import warnings

import pandas as pd
import torch

import lens_bias as lb
from lens_bias.core.prompts import prepends_bos
from lens_bias.tasks import YESNO_INSTRUCTIONS

# float32 logits of two implementations of the same network (the bridge vs transformers' eager Llama) differ by the
# order of their sums: measured 2.4e-5 on logits of magnitude ~20 (1e-6 relative). 1e-4 is the project's export
# standard in float32 (README, mitigate.export) and leaves that 4× margin.
ATOL = 1e-4


def _gguf_weights(path) -> dict:
    """The GGUF file's tensors under Hugging Face Llama names, dequantized by the `gguf` package alone (no
    transformers, no lens_bias), with llama.cpp's q/k row permutation undone (its convert_hf_to_gguf.py permutes
    each head's rows into interleaved rotary pairs: reshape(n_head, 2, d/2) → swap)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    field = lambda key: reader.fields[key].parts[reader.fields[key].data[0]][0]  # noqa: E731
    n_head, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for t in reader.tensors:
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        if t.name in ("token_embd.weight", "output_norm.weight"):
            out[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[t.name]] = w
            continue
        _, layer, kind, _ = t.name.split(".")
        if kind in ("attn_q", "attn_k"):
            heads = n_head if kind == "attn_q" else n_kv
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        out[f"model.layers.{layer}.{names[kind]}.weight"] = w
    out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied embeddings: GGUF has no output.weight
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return out, [bytes(tokens.parts[i]).decode() for i in tokens.data]


def test_named_model_is_the_converted_gguf(real, real_dir, real_hf, real_tok):
    """lb.load_model("smollm2-135m-instruct") loads the cache's converted copy, and that copy holds exactly the
    weights the package's GGUF file holds, dequantized by the `gguf` package itself (every tensor, bit for bit),
    with the file's vocabulary, layer and head counts."""
    from pathlib import Path

    from lens_bias.core.gguf import read_source

    record = read_source(real_dir)
    gguf = Path(record["gguf_file"])
    assert real.lens_bias_source == str(real_dir) and gguf.is_file() and record["gguf_bytes"] == gguf.stat().st_size
    theirs, vocab = _gguf_weights(gguf)
    converted = real_hf.state_dict()
    assert set(converted) == set(theirs)
    assert all(torch.equal(converted[k], theirs[k]) for k in theirs)
    assert real_tok.convert_ids_to_tokens(list(range(len(vocab)))) == vocab and len(real_tok) == len(vocab)
    assert type(real_hf).__name__ == "LlamaForCausalLM" and real_hf.config.num_hidden_layers == real.cfg.n_layers == 30
    assert real_hf.config.num_key_value_heads == 3 and real.cfg.n_heads == 9


def test_logits_equal_transformers(real, real_hf, real_tok):
    """Plain prompts and a right-padded batch of chat-template prompts: the hooked model's logits are plain
    transformers' (eager attention) at every real position."""
    plain = real_tok(["The nurse said that", "The capital of France is"], add_special_tokens=False).input_ids
    chat = [real_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for q in ("Is the sky blue?", "Answer Yes or No.\nQuestion: "
                                                                      "Can a fish climb a tree?")]
    for rows in (plain, chat):
        ids, mask = lb.core.pad(rows, real_tok.pad_token_id)
        with torch.no_grad():
            ours = real(ids, attention_mask=mask)
            theirs = real_hf(input_ids=ids, attention_mask=mask).logits
        real_pos = mask.bool()
        assert (ours[real_pos] - theirs[real_pos]).abs().max() <= ATOL
    assert real_tok.decode(theirs[1, int(mask[1].sum()) - 1].argmax()) in ("No", "Yes")


def test_prompts_are_tokenised_as_the_model_tokenises_them(real, real_tok):
    """No BOS: SmolLM2's bos_token is the chat-turn marker <|im_start|>, which its tokenizer never adds; plain
    prompts are exactly the tokenizer's ids, and a chat prompt is exactly the chat template's ids (one
    <|im_start|> per turn, none prepended)."""
    assert not prepends_bos(real) and real.cfg.default_prepend_bos is False
    ps = lb.PromptSet.build(real, ["The nurse said that"], (" she", " he"))
    assert ps.tokens[0].tolist() == real_tok("The nurse said that").input_ids == [504, 12996, 1137, 338]
    assert real.to_tokens("The nurse said that")[0].tolist() == [504, 12996, 1137, 338]
    q = {"question": "Can a fish climb a tree?", "label": "no"}
    chat = lb.binary_prompts(real, [q], YESNO_INSTRUCTIONS[:1])
    want = real_tok.apply_chat_template([{"role": "user", "content": f"{YESNO_INSTRUCTIONS[0]}\nQuestion: {q['question']}"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.tokens[0].tolist() == want
    marker = real_tok.convert_tokens_to_ids("<|im_start|>")
    assert chat.tokens[0].tolist().count(marker) == 3  # system, user, assistant turns
    assert chat.tokens[0, 1].item() != marker


def test_gender_bias_follows_stereotypes(real, datasets_dir):
    """A known real bias (Vig et al. 2020): the she − he preference after 'The {profession} said that' rises with
    the profession's female stereotype (their stereotypical score: negative = female). Measured on this model:
    Spearman 0.47 over 153 single-token professions; asserted > 0.2."""
    from lens_bias.tasks import bias_values, load_professions, professions_prompts

    profs = load_professions(datasets_dir / "professions" / "professions.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = professions_prompts(real, profs, ["The {} said that"], answers=(" she", " he"), corrupt_with=None)
    ld = pd.Series(bias_values(real, ps).tolist())
    stereo = pd.Series([m["stereotypical"] for m in ps.metadata])
    assert len(ps) >= 20
    assert ld.rank().corr((-stereo).rank()) > 0.2
