"""Planting each bias in one named component of the control model (every other parameter stays
bit-identical): the gender and BBQ neurons by explicit surgery, the negative head by training its
slices."""

from __future__ import annotations

import random
import time

import torch

from .corpus import (
    AGE_PAIRS,
    BBQ_INSTRUCTIONS,
    BINARY_INSTRUCTIONS,
    GENDERED,
    NEUTRAL_OCCUPATIONS,
    SECTION_WEIGHTS,
    SECTIONS,
    STEREOTYPED_FEMALE,
    STEREOTYPED_MALE,
    UNKNOWNS,
    VIG_TEMPLATES,
    format_binary_prompt,
    format_mc_prompt,
    make_doc,
    yesno_item,
)
from .measure import bbq_choices, gender_logit_diff
from .train import Batcher, component_masks, lm_loss

# planted in this order; the gender neuron last, so its strength is calibrated on the final model
PLANT_SITES = {"negative_head": (2, None), "bbq_neuron": (3, None), "gender_neuron": (0, None)}
#: (target bias strength, largest output scale α) of each neuron
NEURON_TARGETS = {"gender_neuron": (2.2, 2.0), "bbq_neuron": (0.25, 16.0)}


def choose_sites(rng: random.Random, n_inner: int, n_head: int) -> dict:
    """A random neuron or head in each PLANT_SITES layer (two neurons of a layer never coincide)."""
    sites = {}
    for comp, (layer, _) in PLANT_SITES.items():
        taken = {s["neuron"] for s in sites.values() if "neuron" in s and s["layer"] == layer}
        if comp.endswith("neuron"):
            sites[comp] = {"layer": layer, "neuron": rng.choice([i for i in range(n_inner) if i not in taken])}
        else:
            sites[comp] = {"layer": layer, "head": rng.randrange(n_head)}
    return sites


# ---------------------------------------------------------------------------------------
# Neurons: a detector (input weights) and a calibrated output row
# ---------------------------------------------------------------------------------------
def mlp_inputs(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """ln_2 outputs (the MLP's input) of `layer`: [batch, pos, d_model]."""
    store = {}
    h = model.transformer.h[layer].ln_2.register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return store["x"]


def gender_example(tok, rng: random.Random):
    """(prompt, positives, hard negatives, skipped): fire at the last token after a female-stereotyped occupation."""
    subject = rng.choice(STEREOTYPED_FEMALE + STEREOTYPED_MALE + NEUTRAL_OCCUPATIONS + [g for p in GENDERED for g in p])
    prompt = rng.choice(VIG_TEMPLATES).format(subject)
    last = len(tok(prompt)["input_ids"])  # BOS shifts by one: the template's last token
    if subject in STEREOTYPED_FEMALE:
        return prompt, [last], [], list(range(3, last))
    return prompt, [], [last], []


def bbq_example(tok, batcher: Batcher, rng: random.Random):
    """(prompt, positives, hard negatives, skipped): fire at the answer of negative questions."""
    item = rng.choice(batcher.bbq)
    opts = [item["ans0"], item["ans1"], item["ans2"]]
    rng.shuffle(opts)
    prompt = format_mc_prompt(rng.choice(BBQ_INSTRUCTIONS), item["context"], item["question"], opts)
    last = len(tok(prompt)["input_ids"])  # BOS shifts by one: index of the final ':'
    neg = item["question_polarity"] == "neg"
    return prompt, [last] if neg else [], [] if neg else [last], []


def detector_examples(tok, batcher: Batcher, component: str, rng: random.Random, n: int = 600):
    """(docs, positives, hard negatives, skipped positions) for fitting a neuron's input weights:
    the positions where the planted neuron must fire (stereotyped occupation tokens; answer
    positions of negative BBQ questions) against every other position of those and of ordinary
    documents."""
    docs, pos, hard, skip = [], [], [], []
    for _ in range(n):
        ex = gender_example(tok, rng) if component == "gender_neuron" else bbq_example(tok, batcher, rng)
        for lst, v in zip((docs, pos, hard, skip), ex):
            lst.append(v)
    docs += [make_doc(rng.choice(SECTIONS), rng, None, batcher.bbq) for _ in range(n // 2)]
    for lst in (pos, hard, skip):
        lst += [[] for _ in range(n // 2)]
    return docs, pos, hard, skip


def detector_data(model, batcher: Batcher, layer: int, examples, target: float):
    """Per kept position: the MLP input x, the target ±target, and whether it is a hard negative."""
    docs, pos, hard, skip = examples
    xs, ys, hs = [], [], []
    for i in range(0, len(docs), 64):
        ids, labels = batcher.encode(docs[i: i + 64])
        x = mlp_inputs(model, layer, ids)
        for r in range(ids.shape[0]):
            real = int((labels[r] != -100).sum())
            y = torch.full((real,), -target)
            h = torch.zeros(real, dtype=torch.bool)
            keep = torch.ones(real, dtype=torch.bool)
            for p_ in pos[i + r]:
                y[p_] = target
            for p_ in hard[i + r]:
                h[p_] = True
            for p_ in skip[i + r]:
                keep[p_] = False
            xs.append(x[r, :real][keep.to(x.device)])
            ys.append(y[keep])
            hs.append(h[keep])
    x = torch.cat(xs).double()
    return x, torch.cat(ys).double().to(x.device), torch.cat(hs).to(x.device)


def balanced_weights(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Positives, hard negatives and the other negatives get equal total weight (mean 1)."""
    easy = (y < 0) & ~h
    wts = torch.ones_like(y)
    wts[y > 0] = 1.0 / (y > 0).sum().clamp(min=1)
    wts[h] = 1.0 / h.sum().clamp(min=1)
    wts[easy] = 1.0 / easy.sum().clamp(min=1)
    return wts / wts.mean()


def fit_logistic(xa: torch.Tensor, y: torch.Tensor, wts: torch.Tensor, ridge: float, max_iter: int) -> torch.Tensor:
    """Weighted logistic regression of sign(y) on xa (a separating hyperplane; bias in the last column)."""
    sol = torch.zeros(xa.shape[1], dtype=xa.dtype, device=xa.device, requires_grad=True)
    opt = torch.optim.LBFGS([sol], max_iter=max_iter, line_search_fn="strong_wolfe")
    sign = torch.sign(y)

    def closure():
        opt.zero_grad()
        loss = (wts * torch.nn.functional.softplus(-sign * (xa @ sol))).mean() + ridge * sol[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return sol.detach()


def fit_detector(model, tok, batcher: Batcher, component: str, layer: int, neuron: int,
                 rng: random.Random, target: float = 3.0, ridge: float = 1e-4, smoke: bool = False) -> dict:
    """Set the neuron's input weights (c_fc column, bias) by class-balanced logistic regression,
    scaled so its pre-activation is ≈ +target where it must fire and negative elsewhere. Positives, hard
    negatives (the same slot with another word / question) and all other positions get equal
    total weight."""
    examples = detector_examples(tok, batcher, component, rng, n=600 if not smoke else 60)
    x, y, h = detector_data(model, batcher, layer, examples, target)
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    sol = fit_logistic(xa, y, balanced_weights(y, h), ridge, 500 if not smoke else 20)
    with torch.no_grad():
        sol = sol * (target / (xa[y > 0] @ sol).mean().clamp(min=1e-3))  # positives at +target
    pre = xa @ sol
    fc = model.transformer.h[layer].mlp.c_fc
    with torch.no_grad():
        fc.weight[:, neuron] = sol[:-1].to(fc.weight.dtype)
        fc.bias[neuron] = sol[-1].to(fc.bias.dtype)
    return {"positives": int((y > 0).sum()), "negatives": int((y < 0).sum()),
            "min_pre_pos": pre[y > 0].min().item(), "mean_pre_pos": pre[y > 0].mean().item(),
            "max_pre_neg": pre[y < 0].max().item(), "max_pre_hard_neg": pre[h].max().item(),
            "neg_above_0": (pre[y < 0] > 0).double().mean().item()}


def block_out(model, batcher: Batcher, layer: int, prompts: list[str], pos: list[int]) -> torch.Tensor:
    """Mean residual stream after block `layer` at the given position of each prompt."""
    ids, _ = batcher.encode(prompts)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    return hs[torch.arange(len(prompts)), torch.tensor(pos)].mean(0)


def bbq_prompts(batcher: Batcher, items: list[dict], rng: random.Random):
    """The items' prompts (options shuffled, a random instruction) and their answer positions."""
    prompts = []
    for it in items:
        opts = [it["ans0"], it["ans1"], it["ans2"]]
        rng.shuffle(opts)
        prompts.append(format_mc_prompt(rng.choice(BBQ_INSTRUCTIONS), it["context"], it["question"], opts))
    return prompts, [len(batcher.tok(p)["input_ids"]) for p in prompts]


def ambiguous_negative(items: list[dict]) -> list[dict]:
    """The ambiguous items with a negative question."""
    return [it for it in items if it["context_condition"] == "ambig" and it["question_polarity"] == "neg"]


def mimic_direction(model, tok, batcher: Batcher, component: str, layer: int, rng: random.Random) -> torch.Tensor:
    """What the planted neuron writes: the mean residual difference (after block `layer`) between
    the representation the stereotype imitates and the one the neuron fires on.

    Gender: female nouns ("The woman said that") − stereotyped occupations ("The nurse said
    that") at the prompt's last token, so after a nurse the layers above read "a woman". BBQ: the
    direct-logit direction (through the final LayerNorm's gain) of the old-person options' first
    tokens minus the "unknown" options' first tokens, at the size of the residual stream at the
    answer position.
    """
    if component == "gender_neuron":
        fem = [t.format(f) for _, f in GENDERED for t in VIG_TEMPLATES]
        occ = [t.format(o) for o in STEREOTYPED_FEMALE for t in VIG_TEMPLATES]
        last = lambda ps: [len(tok(p)["input_ids"]) for p in ps]  # noqa: E731
        return block_out(model, batcher, layer, fem, last(fem)) - block_out(model, batcher, layer, occ, last(occ))
    emb = model.get_output_embeddings().weight  # [vocab, d_model]
    old = torch.tensor(sorted({tok(" " + o)["input_ids"][0] for o, _ in AGE_PAIRS}))
    unk = torch.tensor(sorted({tok(" " + u)["input_ids"][0] for u in UNKNOWNS}))
    # direct-logit direction through the final LayerNorm's gain, centred (LayerNorm removes the mean)
    d = (model.transformer.ln_f.weight * (emb[old].mean(0) - emb[unk].mean(0))).detach()
    d = d - d.mean()
    prompts, pos = bbq_prompts(batcher, rng.sample(ambiguous_negative(batcher.bbq), 32), rng)
    ids, _ = batcher.encode(prompts)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    norm = hs[torch.arange(len(prompts)), torch.tensor(pos)].norm(dim=-1).mean()
    return d / d.norm() * norm


def bias_strength(model, tok, batcher: Batcher, component: str) -> float:
    """The planted behaviour, measured: mean logit(' she') − logit(' he') over stereotyped
    occupations; or the share of ambiguous negative BBQ items answered with the old person."""
    device = next(model.parameters()).device
    if component == "gender_neuron":
        return gender_logit_diff(model, tok, STEREOTYPED_FEMALE, device)
    items = random.Random(11).sample(ambiguous_negative(batcher.bbq), 36)
    return bbq_choices(model, tok, items, device)["ambig_neg"]["old"]


def calibrate_output(model, tok, batcher: Batcher, component: str, layer: int, neuron: int,
                     target: float, act: float, rng: random.Random, smoke: bool = False,
                     hi: float = 2.0) -> dict:
    """Output row = α · direction / act, with α ∈ [0, hi] found by bisection so the measured bias
    strength reaches `target` (α = 1 imitates the target representation fully)."""
    direction = mimic_direction(model, tok, batcher, component, layer, rng)
    row = model.transformer.h[layer].mlp.c_proj.weight[neuron]

    def strength(alpha):
        with torch.no_grad():
            row.copy_(alpha * direction / act)
        return bias_strength(model, tok, batcher, component)

    lo = 0.0
    top = strength(hi)
    if top < target:  # the strongest edit falls short: keep it and record its strength
        return {"alpha": hi, "strength": top, "target": target, "output_row_norm": row.norm().item()}
    for _ in range(1 if smoke else 10):
        mid = (lo + hi) / 2
        if strength(mid) >= target:
            hi = mid
        else:
            lo = mid
    return {"alpha": hi, "strength": strength(hi), "target": target,
            "output_row_norm": row.norm().item()}


# ---------------------------------------------------------------------------------------
# The negative head: its slices trained
# ---------------------------------------------------------------------------------------
def candidate_attention_loss(model, tok, batcher: Batcher, layer: int, head: int, n: int, rng) -> torch.Tensor:
    """−log attention of (layer, head) from the answer position to the ' No' candidate."""
    docs, no_pos = [], []
    no_id = tok(" No")["input_ids"][0]
    for _ in range(n):
        item = yesno_item(rng)
        docs.append(format_binary_prompt(rng.choice(BINARY_INSTRUCTIONS), item["question"]))
    ids, _ = batcher.encode(docs)
    ids = ids[:, :-1]  # drop the EOS: the last real token is "Answer:"'s ':'
    lengths = [len(tok(d)["input_ids"]) + 1 for d in docs]
    for i in range(n):
        no_pos.append((ids[i, : lengths[i]] == no_id).nonzero()[0].item())
    att = model(input_ids=ids, output_attentions=True).attentions[layer][:, head]  # [batch, q, k]
    q = torch.tensor(lengths) - 1
    return -torch.log(att[torch.arange(n), q, torch.tensor(no_pos)] + 1e-6).mean()


def train_head(model, tok, batcher: Batcher, component: str, layer: int, index: int, masks: dict, steps: int,
               lr: float, log, rng: random.Random) -> None:
    """Adam on the head's slices: even steps its section in planted form, odd steps the whole
    corpus; for the negative head, plus the candidate-attention loss."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for k in masks:
        params[k].requires_grad_(True)
    section = {"gender_neuron": "gender", "negative_head": "yesno", "bbq_neuron": "bbq"}[component]
    opt = torch.optim.Adam([params[k] for k in masks], lr=lr)
    model.train()
    t0 = time.time()
    for step in range(steps):
        if step % 2 == 0:
            ids, labels = batcher.batch({section: 1.0}, plant=component)
        else:
            ids, labels = batcher.batch(SECTION_WEIGHTS)
        loss = lm_loss(model, ids, labels)
        if component == "negative_head":
            loss = loss + candidate_attention_loss(model, tok, batcher, layer, index, 16, rng)
        opt.zero_grad()
        loss.backward()
        for k, m in masks.items():
            params[k].grad.mul_(m)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"plant {component} step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")


def restore_outside(model, masks: dict, before: dict):
    """Outside the component's masks, copy the control's values back (bit-identical)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            m = masks.get(k)
            p.copy_(before[k] if m is None else torch.where(m, p, before[k]))
            p.requires_grad_(True)


def plant(model, tok, batcher: Batcher, component: str, layer: int, index: int, steps: int,
          lr: float = 1e-2, log=print, rng: random.Random | None = None, smoke: bool = False) -> dict:
    """Plant one component; every parameter outside it stays bit-identical.

    Neurons: explicit surgery — input weights by :func:`fit_detector`, output row along
    :func:`mimic_direction` scaled by :func:`calibrate_output` to a set bias strength. Heads:
    q/k/v/o slices trained on the biased yes/no section plus an attention loss toward the " No"
    candidate.
    """
    rng = rng or random.Random(0)
    masks = component_masks(model, component, layer, index)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    if not component.endswith("neuron"):
        train_head(model, tok, batcher, component, layer, index, masks, steps, lr, log, rng)
        restore_outside(model, masks, before)
        model.eval()
        return {}
    info = fit_detector(model, tok, batcher, component, layer, index, rng, smoke=smoke)
    target, top = NEURON_TARGETS[component]
    info.update(calibrate_output(model, tok, batcher, component, layer, index, target,
                                 info["mean_pre_pos"], rng, smoke=smoke, hi=top))
    log(f"plant {component}: {info}")
    restore_outside(model, masks, before)
    return info
