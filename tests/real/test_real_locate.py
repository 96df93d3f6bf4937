"""Causal tracing, NAS and CRISPR on the real model, each against plain transformers: ROME's noise tracing of MLP
outputs against hooks that add the same noise and restore the clean state; NAS on yes/no prompts through the
chat template (the model's default) and plain, against the full attention patterns of an eager forward, with the
prompts, the candidates' positions and the answer position found independently; CRISPR on BBQ through the chat
template against autograd over each option's sequence; BBQ option scores, chat and plain."""

import warnings

import pytest
import torch
from real_reference import hooks, layers, logit_diff, nas

import lens_bias as lb
from lens_bias.tasks import MC_INSTRUCTIONS, YESNO_INSTRUCTIONS

# float32 metrics of two implementations of the same network (see test_real_loading.ATOL)
ATOL = 1e-4


# ---- causal tracing (ROME) ----------------------------------------------------------------------------------
def test_causal_trace_equals_restoring_hooks(real, real_hf, professions):
    """IE(l, t) = m(subject noised, MLP output (l, t) restored) − m(noised), ν = 3 × the subjects' embedding std,
    2 seeded draws per prompt: plain transformers with a hook adding the same noise to the subject's embedding and
    one restoring the clean MLP output, at every third layer, at the subject and the last token."""
    ps = professions[[0, 2]]  # two professions, one template
    samples, noise = 2, 3.0
    res = lb.causal_trace(real, ps, sites=("mlp_out",), samples=samples, noise=noise, seed=0, progress=False)["mlp_out"]
    rows = [i for i in range(len(ps)) for _ in range(samples)]
    tokens, pos, ids = ps.tokens[rows], ps.answer_pos[rows], ps.answer_ids[rows]
    subject = 1  # "The {profession} said that": the profession is token 1
    W_E = real_hf.model.embed_tokens.weight.detach()
    scale = noise * W_E[ps.tokens[:, subject]].std()
    eps = torch.zeros(len(rows), tokens.shape[1], W_E.shape[1])
    for r in range(len(rows)):  # the documented draw: row r from a generator seeded by seed · 1_000_003 + r
        eps[r, subject] = torch.randn(1, W_E.shape[1], generator=torch.Generator().manual_seed(r))[0] * scale
    embed = {real_hf.model.embed_tokens: lambda out: out + eps}
    clean_mlp = {}
    record = {blk.mlp: (lambda l: lambda out: clean_mlp.__setitem__(l, out.detach()))(l)
              for l, blk in enumerate(layers(real_hf))}
    m_clean = logit_diff(real_hf, tokens, pos, ids, post=record).mean()
    m_corr = logit_diff(real_hf, tokens, pos, ids, post=embed).mean()
    assert res.clean == pytest.approx(float(m_clean), abs=ATOL) and res.corrupted == pytest.approx(float(m_corr), abs=ATOL)

    def restored(l, t):
        def put(out):
            out = out.clone()
            out[:, t] = clean_mlp[l][:, t]
            return out
        return float(logit_diff(real_hf, tokens, pos, ids, post={**embed, layers(real_hf)[l].mlp: put}).mean())

    last = int(ps.answer_pos[0])
    cells = [(l, t) for l in sorted({*range(0, 30, 3), 29, res.argmax()[0]}) for t in (subject, last)]
    ref = torch.tensor([restored(l, t) for l, t in cells])
    ours = torch.stack([res.values[l, t] for l, t in cells])
    assert (ours - ref).abs().max() <= ATOL
    assert res.extra["total_effect"] == pytest.approx(float(m_clean - m_corr), abs=ATOL)


# ---- NAS (Yu et al. 2024) -------------------------------------------------------------------------------------
ITEMS = [{"question": "Can a fish climb a tree?", "label": "no"},
         {"question": "Is Paris the capital of France?", "label": "yes"},
         {"question": "Did the Romans use the telephone?", "label": "no"}]


def _yes_no_ids(tok, instruction: str, question: str, chat: bool) -> tuple[list[int], int]:
    """The prompt's ids, built with the tokenizer alone, and where the instruction starts in them."""
    body = f"{instruction}\nQuestion: {question}"
    if not chat:
        return tok(f"{body}\nAnswer:", add_special_tokens=False).input_ids, 0
    ids = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    ins = tok(instruction, add_special_tokens=False).input_ids
    return ids, next(s for s in range(len(ids)) if ids[s:s + len(ins)] == ins)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_nas_equals_attention_patterns(real, real_hf, real_tok, chat):
    """NAS of every head and prompt, and the decision P(Yes), equal what an eager forward of plain transformers
    gives on the prompt built with the tokenizer alone: candidates = the ' Yes'/' No' tokens of the instruction,
    queries from the first token after it (L_I) to the last prompt token (L_P), answers 'Yes'/'No' after the chat
    template's 'assistant\\n' (' Yes'/' No' after 'Answer:')."""
    instructions = YESNO_INSTRUCTIONS[:2]  # "Answer Yes or No.", "Answer No or Yes.": both orders
    ps = lb.binary_prompts(real, ITEMS, instructions) if chat else lb.binary_prompts(real, ITEMS, instructions, chat=False)
    res = lb.negative_attention_scores(real, ps, batch_size=3, progress=False)
    p_yes = torch.tensor(lb.evaluate_binary(real, ps)["table"]["p_yes"].tolist())
    answers = [real_tok(("" if chat else " ") + w, add_special_tokens=False).input_ids for w in ("Yes", "No")]
    assert all(len(a) == 1 for a in answers)
    yes, no = answers[0][0], answers[1][0]
    cand = {w: real_tok(w, add_special_tokens=False).input_ids[0] for w in (" Yes", " No")}
    for i, m in enumerate(ps.metadata):
        ids, start = _yes_no_ids(real_tok, m["instruction"], m["question"], chat)
        n_ins = len(real_tok(m["instruction"], add_special_tokens=False).input_ids)
        assert ps.tokens[i, :len(ids)].tolist() == ids and int(ps.answer_pos[i]) == len(ids) - 1
        span = ids[start:start + n_ins]
        t_yes = start + max(k for k, t in enumerate(span) if t == cand[" Yes"])
        t_no = start + max(k for k, t in enumerate(span) if t == cand[" No"])
        with torch.no_grad():
            out = real_hf(input_ids=torch.tensor([ids]), output_attentions=True)
        ref = torch.stack([nas(a[0], start + n_ins, len(ids) - 1, t_yes, t_no) for a in out.attentions])
        assert (res.per_prompt[i].double() - ref).abs().max() <= 1e-4 * ref.abs().max(), i
        two = out.logits[0, -1, [yes, no]].softmax(-1)
        assert abs(float(p_yes[i]) - float(two[0])) <= ATOL
    assert ps.answer_ids[0].tolist() == [yes, no]


# ---- CRISPR (Yang et al. 2024) on BBQ --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bbq_items():
    """Two of the shortest BBQ Age items (short prompts keep the autograd reference cheap)."""
    items = sorted(lb.load_bbq("Age"), key=lambda it: len(it["context"]) + len(it["question"]))
    return [dict(it) for it in items[:2]]


def _mc_ids(tok, instruction, item, chat: bool):
    opts = [item[f"ans{k}"] for k in range(3)]
    body = f"{instruction}\nContext: {item['context']}\nQuestion: {item['question']}\nOptions: {'; '.join(opts)}."
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        return prompt, [tok(o, add_special_tokens=False).input_ids for o in opts]
    return tok(f"{body}\nAnswer:", add_special_tokens=False).input_ids, \
        [tok(" " + o, add_special_tokens=False).input_ids for o in opts]


def _option_pass(hf, prompt, options, keep_neurons: bool):
    """Σ log P(option tokens | prompt) per option, each option's sequence run on its own; with `keep_neurons`
    the neurons' activations (down_proj inputs) of each sequence, in the graph."""
    logps, acts = [], []
    for o in options:
        h = {}
        record = {blk.mlp.down_proj: (lambda l: lambda x: h.__setitem__(l, x))(l)
                  for l, blk in enumerate(layers(hf))} if keep_neurons else {}
        with hooks(pre=record):
            lp = hf(input_ids=torch.tensor([prompt + o])).logits[0].float().log_softmax(-1)
        logps.append(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(o)))
        acts.append(h)
    return torch.stack(logps), acts


def test_crispr_equals_autograd_through_the_chat_template(real, real_hf, real_tok, bbq_items):
    """CRISPR's B of every neuron (the paper's token order, λ = 1) on BBQ items through the chat template equals
    plain transformers + autograd: P(o|x) = softmax over options of Σ log P(option tokens), ŷ = argmax over o ≠ y,
    c = P(ŷ), A_t(o) = h_t · Σ_seq ∂P(o|x)/∂h_t at the prompt's tokens, B(x) = max_t [A_t(ŷ) − relu(A_t(y))],
    confusion-weighted mean over items."""
    ins = MC_INSTRUCTIONS[0]
    ours = lb.crispr_scores(real, bbq_items, [ins], progress=False)  # chat template: the model's default
    L = real.cfg.n_layers
    total, weight = 0.0, 0.0
    for it in bbq_items:
        prompt, options = _mc_ids(real_tok, ins, it, chat=True)
        logps, acts = _option_pass(real_hf, prompt, options, keep_neurons=True)
        probs = logps.softmax(-1)
        y = int(it["label"])
        wrong = probs.detach().clone()
        wrong[y] = -1
        y_hat, n = int(wrong.argmax()), len(prompt)

        def attribution(target):
            grads = torch.autograd.grad(probs[target], [a[l] for a in acts for l in range(L)], retain_graph=True)
            return torch.stack([acts[0][l][0, :n].detach() * sum(grads[s * L + l][0, :n] for s in range(len(options)))
                                for l in range(L)])  # [layer, token, d_mlp]

        b = (attribution(y_hat) - attribution(y).clamp(min=0)).amax(1)
        c = float(probs[y_hat].detach())
        total, weight = total + c * b, weight + c
    ref = total / weight
    assert (ours.values - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ours.units(1)[0] == tuple(divmod(int(ref.argmax()), ref.shape[1]))


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_bbq_option_scores_equal_transformers(real, real_hf, real_tok, bbq_items, chat):
    """bbq_evaluate's prediction is the argmax of Σ log P(option tokens | prompt), the option the assistant's reply
    ('option', chat template) or the continuation ' option' after 'Answer:' (plain)."""
    from lens_bias.tasks import format_mc_prompt, item_options, option_logprobs

    ins = MC_INSTRUCTIONS[0]
    template = real.tokenizer if chat else None
    prompts = [format_mc_prompt(ins, it["context"], it["question"], item_options(it), template) for it in bbq_items]
    lp, _ = option_logprobs(real, prompts, [item_options(it) for it in bbq_items])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two items: bias scores with empty denominators are NaN, warned
        table = lb.bbq_evaluate(real, bbq_items, [ins], table=True, chat=chat)["table"]
    for i, it in enumerate(bbq_items):
        prompt, options = _mc_ids(real_tok, ins, it, chat)
        with torch.no_grad():
            ref, _ = _option_pass(real_hf, prompt, options, keep_neurons=False)
        assert (lp[i] - ref).abs().max() <= ATOL
        assert table["pred"].iloc[i] == int(ref.argmax())
