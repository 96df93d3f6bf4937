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


def test_named_model_is_the_converted_gguf(real, real_dir):
    """lb.load_model("smollm2-135m-instruct") loads the cache's converted copy, and that copy holds exactly the
    weights transformers' own GGUF reader dequantizes from the package's file (every tensor, bit for bit)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens_bias.core.gguf import read_source

    record = read_source(real_dir)
    gguf = Path(record["gguf_file"])
    assert real.lens_bias_source == str(real_dir) and gguf.is_file()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32).state_dict()
    theirs = ref.state_dict()
    assert set(converted) == set(theirs)
    assert all(torch.equal(converted[k], theirs[k]) for k in theirs)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "The nurse said that she was tired.\nNo, it is not."
    assert real.tokenizer(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert type(ref).__name__ == "LlamaForCausalLM" and ref.config.num_hidden_layers == real.cfg.n_layers == 30
    assert ref.config.num_key_value_heads == 3 and real.cfg.n_heads == 9


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
