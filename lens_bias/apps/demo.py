"""`lens-bias demo`: locate → prove → mitigate → check capability → export, offline, in plain words.

On a real model (default: SmolLM2-135M-Instruct, `lens-bias fetch smollm2-135m-instruct`): the she/he
bias after female-stereotyped professions, located in attention heads by activation and attribution
patching, proved by ablating the top heads against random heads on held-out professions and templates,
removed by pruning those heads (a weight edit), capability checked on real English text and a cloze
set, and the edited model exported as a Hugging Face directory.

On the model organism (`--model organism`, about 30 s): the same calls against its planted ground
truth — gender bias by patching, attribution and causal tracing, removed by pruning and by an LSDM
edit that is exported; the negative head found by NAS and ablated. Figures (HTML) and tables (CSV)
go to `out`.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.files import atomic_dir, check_output_dir, write_table, write_text
from ..core.hooks import device_of
from ..core.metrics import answer_logits_fast
from ..core.model_names import MODELS, converted_dir
from ..core.models import HookedModel, resolve_model
from ..core.prompts import PromptSet
from ..core.viz import heatmap, save_figure
from ..locate.attribution import agreement, attribution_patching
from ..locate.nas import nas_heatmap, negative_attention_scores
from ..locate.patching import activation_patching
from ..locate.tracing import causal_trace, trace_sites
from ..mitigate.ablation import head_ablation_hooks, neuron_ablation_hooks, random_units
from ..mitigate.edits import save_edit
from ..mitigate.export import export_model
from ..mitigate.lsdm import lsdm_edit
from ..mitigate.prune import prune_heads
from ..organism import data_path, load_card
from ..tasks.capability import bias_values, cloze_accuracy, compare_models, default_neutral_text, text_lines, text_loss
from ..tasks.gender import VIG_TEMPLATES, professions_prompts, stereotyped_professions
from ..tasks.yesno import binary_prompts, evaluate_binary, load_yes_no


def gender_pairs(model: HookedModel, card: dict, templates: int = 3) -> PromptSet:
    """Stereotyped-occupation prompts, corrupted by a neutral occupation (same length)."""
    g = card["planted"]["gender_neuron"]
    return professions_prompts(model, g["occupations"], g["templates"][:templates], answers=(" she", " he"),
                               corrupt_with=g["neutral_occupations"])


DEFAULT_MODEL = "smollm2-135m-instruct"


def run_demo(out: Path = Path("lens-bias-out"), device=None, dtype=None, seed: int = 0, progress: bool = False,
             overwrite: bool = False, model: str | HookedModel = DEFAULT_MODEL) -> str:
    """Run the demo on `model` (the organism: its planted-truth demo; any other name, or a model already
    loaded: the real-model demo) into `out` (refused when it holds files, unless `overwrite`); returns the
    report.

    The files are written to a temporary sibling folder and moved into `out` when all are done, so a
    failed or killed demo leaves `out` as it was."""
    out = check_output_dir(out, overwrite)
    hooked, _ = resolve_model(model, device=device, dtype=dtype, progress=progress)
    with atomic_dir(out, merge=True) as work:
        steps = _demo if isinstance(model, str) and model == "organism" else _real_demo
        report = steps(hooked, work, out, seed, progress)
    return report


def _demo(model, out: Path, final: Path, seed: int, progress: bool) -> str:
    """The demo's steps, writing into `out`; the report names `final`, where the files end up."""
    torch.manual_seed(seed)
    card = load_card("organism")
    truth = card["planted"]
    lines = ["lens_bias demo — model organism (ground truth in data/organism/lens_bias_card.json)", ""]

    # ---- locate gender bias ---------------------------------------------------------------
    g = truth["gender_neuron"]
    pairs = gender_pairs(model, card)
    said = pairs[[i for i, p in enumerate(pairs.prompts) if p.endswith("said that")]]
    mlp = activation_patching(model, said, "mlp_out", progress=progress)
    attr = attribution_patching(model, pairs, ["neuron", "head"])
    # traced on the neutral twins: noise on the organism's one-token subjects moves the bias away from zero
    traced = causal_trace(model, said, sites=("mlp_out",), corruption="counterfactual", seed=seed,
                          progress=progress)["mlp_out"]
    save_figure(heatmap(mlp, title="Activation patching: MLP outputs (layer × position)"), out / "patching_mlp.html")
    save_figure(heatmap(traced, title="Causal tracing: restoring MLP outputs"), out / "tracing_mlp.html")
    write_table(out / "patching_mlp", mlp.to_frame())
    write_table(out / "attribution_top_neurons", attr["neuron"].top(20))
    found = attr["neuron"].argmax()
    lines += [
        f"gender bias: logit(' she') − logit(' he') = {mlp.clean:+.2f} on stereotyped occupations, "
        f"{mlp.corrupted:+.2f} on neutral ones",
        f"  activation patching: top MLP output = layer {mlp.argmax()[0]}, position {mlp.argmax()[1]} "
        f"({mlp.normalized[mlp.argmax()]:.2f} of the effect)",
        f"  attribution patching: top neuron = {found} (planted: {(g['layer'], g['neuron'])}) "
        f"{'✓' if found == (g['layer'], g['neuron']) else '✗'}",
        f"  causal tracing (twins): top MLP = layer {traced.argmax()[0]} (planted: layer {g['layer']})",
    ]
    # ---- mitigate: prune the neuron (hook ablation), verify ------------------------------
    dev = device_of(model)
    s = said.to(dev)
    with torch.no_grad():
        a = answer_logits_fast(model, s.tokens, s.answer_pos, s.answer_ids, neuron_ablation_hooks(model, [found]))  # pyright: ignore[reportArgumentType] - units() of a [layer, neuron] score are pairs
    pruned = (a[:, 0] - a[:, 1]).mean().item()
    lines.append(f"  prune neuron {found}: bias {mlp.clean:+.2f} → {pruned:+.2f}")

    # ---- mitigate by weight edit (LSDM), verify on unseen prompts and capability, export ----
    F, M, N, T = g["occupations"], g["male_occupations"], g["neutral_occupations"], g["templates"]
    def she_he(occupations, templates):
        return professions_prompts(model, occupations, templates, answers=(" she", " he"), corrupt_with=None)

    edit_set = she_he(F[:6] + M[:4] + N[:4], T[:6])
    unseen = she_he(F[6:], T[6:12])
    traced_set = professions_prompts(model, F[:5], T[:2], answers=(" she", " he"), corrupt_with=N)
    site = trace_sites(model, traced_set, seed=seed).iloc[0]
    neutral = data_path("neutral").read_text()
    lsdm = lsdm_edit(model, edit_set, neutral, layers=[int(site["layer"])], position=str(site["position"]),  # pyright: ignore[reportArgumentType] - trace_sites' positions are EditPosition names
                     progress=progress)
    edited, res = lsdm.model, lsdm.report
    cloze = [json.loads(line) for line in data_path("cloze").read_text().splitlines()]
    table = compare_models({"original": model, "lsdm": edited}, {
        "bias_unseen": lambda m: bias_values(m, unseen).mean().item(),
        "neutral_loss": lambda m: text_loss(m, neutral),
        "cloze_accuracy": lambda m: cloze_accuracy(m, cloze)["overall"]})
    write_table(out / "lsdm_before_after", table)
    v = table.pivot(index="measure", columns="model", values="value")
    exported = export_model(edited, out / "organism-lsdm", overwrite=True)
    diff = json.loads((exported / "lens_bias_export.json").read_text())["max_abs_logit_diff"]
    save_edit(lsdm.edit, out / "lsdm_edit.safetensors")
    loss = v.loc["neutral_loss"]
    lines += [
        f"  LSDM edit of MLP layer {res['layers'][0]} W_out at the {res['position']} token (traced): bias on unseen "
        f"occupations/templates {v.loc['bias_unseen', 'original']:+.2f} → {v.loc['bias_unseen', 'lsdm']:+.2f}; "
        f"neutral loss {loss['original']:.3f} → {loss['lsdm']:.3f} "
        f"({100 * (loss['lsdm'] - loss['original']) / loss['original']:+.2f}%), cloze accuracy "
        f"{v.loc['cloze_accuracy', 'original']:.2f} → {v.loc['cloze_accuracy', 'lsdm']:.2f}",
        f"  exported to {exported.name}/ (transformers reloads it: max |Δlogit| {diff:.1e}); edit file lsdm_edit.safetensors",
    ]

    # ---- locate negative bias (NAS) and mitigate by head ablation --------------------------
    h = truth["negative_head"]
    yesno = binary_prompts(model, load_yes_no(data_path("yesno"))[:80])
    nas = negative_attention_scores(model, yesno, progress=progress)
    save_figure(nas_heatmap(nas), out / "nas_heads.html")
    write_table(out / "nas_ranking", nas.ranking())
    top = nas.top_heads(1)
    before = evaluate_binary(model, yesno)
    after = evaluate_binary(model, yesno, ablate=head_ablation_hooks(model, top))
    write_table(out / "yesno_before", before["table"])
    b, a = before["overall"], after["overall"]
    lines += [
        "",
        f"negative bias: top NAS head = {top[0]} (planted: {(h['layer'], h['head'])}) "
        f"{'✓' if top[0] == (h['layer'], h['head']) else '✗'}",
        f"  ablate it: precision−recall gap {b['pr_gap']:+.3f} → {a['pr_gap']:+.3f}, "
        f"accuracy {b['accuracy']:.3f} → {a['accuracy']:.3f}, yes-rate {b['yes_rate']:.3f} → {a['yes_rate']:.3f}",
        "",
        f"figures and tables: {final.resolve()}",
    ]
    report = "\n".join(lines)
    write_text(out / "report.txt", report + "\n")
    return report


# ---------------------------------------------------------------------------------------
# The real-model demo: the professions bias in attention heads
# ---------------------------------------------------------------------------------------
@dataclass
class ProfessionsSplit:
    """Female-stereotyped professions × templates, twins with a neutral profession: `locate` is what the
    methods see, `test` the held-out professions and templates the proof and the mitigation are judged on."""

    locate: PromptSet
    test: PromptSet
    professions: tuple[list[str], list[str]]
    templates: tuple[list[str], list[str]]


def professions_split(model: HookedModel, seed: int = 0, n_templates: tuple[int, int] = (4, 6)) -> ProfessionsSplit:
    """Half the female-stereotyped single-token professions (shuffled with `seed`) and the first templates to
    locate on; the other professions and the next templates held out."""
    female, neutral = stereotyped_professions(model)
    female = list(female)
    random.Random(seed).shuffle(female)
    half = max(1, len(female) // 2)
    t_loc, t_test = VIG_TEMPLATES[:n_templates[0]], VIG_TEMPLATES[n_templates[0]:sum(n_templates)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multi-token and length-mismatched rows are dropped, as documented
        locate = professions_prompts(model, female[:half], t_loc, answers=(" she", " he"), corrupt_with=neutral)
        test = professions_prompts(model, female[half:], t_test, answers=(" she", " he"), corrupt_with=neutral[::-1])
    return ProfessionsSplit(locate, test, (female[:half], female[half:]), (t_loc, t_test))


def _ld(model: HookedModel, ps: PromptSet, hooks=(), corrupted: bool = False) -> float:
    """Mean logit(' she') − logit(' he') over the prompts (or their twins) under `hooks`."""
    p = ps.to(device_of(model))
    tokens = p.corrupted_tokens if corrupted else p.tokens
    with torch.no_grad():
        a = answer_logits_fast(model, tokens, p.answer_pos, p.answer_ids, list(hooks), attention_mask=p.attention_mask)  # pyright: ignore[reportArgumentType] - the set has corrupted tokens when corrupted=True
    return float((a[:, 0] - a[:, 1]).mean())


def _label(unit) -> str:
    return f"L{unit[0]}H{unit[1]}"


def _locate_heads(model: HookedModel, ps: PromptSet, progress: bool) -> dict:
    """Activation patching of every head (exact) and attribution patching (one forward + backward), their
    agreement, and the heads' table."""
    ap = activation_patching(model, ps, "head", per_position=False, progress=progress)
    atp = attribution_patching(model, ps, ["head"])["head"]
    agree = agreement(atp, ap)
    top_ap, top_atp = ap.units(5), atp.units(5)
    table = ap.to_frame().rename(columns={"effect": "patching_effect"})
    table["attribution"] = atp.effect.reshape(-1).tolist()
    table = table.sort_values("patching_effect", ascending=False).reset_index(drop=True)
    return {"patching": ap, "attribution": atp, "agreement": agree, "overlap5": len(set(top_ap) & set(top_atp)),
            "table": table}


def _ablation_proof(model: HookedModel, ps: PromptSet, top: list, ks=(1, 3), seeds: int = 10, seed: int = 0) -> dict:
    """Share of the held-out excess bias (LD − LD on the twins) removed by zero-ablating the top-k heads, and
    by k random heads (`seeds` draws): the proof that the located heads carry it."""
    base, ref = _ld(model, ps), _ld(model, ps, corrupted=True)
    share = lambda ld: (base - ld) / (base - ref)  # noqa: E731
    rows = []
    for k in ks:
        rows.append({"k": k, "units": " ".join(map(_label, top[:k])), "kind": "top",
                     "removed": share(_ld(model, ps, head_ablation_hooks(model, top[:k])))})
        for s in range(seeds):
            heads = random_units(model, k, seed + 1000 * k + s, exclude=top[:k], site="head")
            rows.append({"k": k, "units": " ".join(map(_label, heads)), "kind": "random",
                         "removed": share(_ld(model, ps, head_ablation_hooks(model, heads)))})
    import pandas as pd

    return {"bias": base, "reference": ref, "table": pd.DataFrame(rows)}


def _choose_k(model: HookedModel, ps: PromptSet, top: list, ks=(1, 3)) -> int:
    """The smallest k whose top-k heads remove half the locate split's excess bias (else the largest k):
    chosen on the prompts the heads were found on, never on the held-out ones."""
    base, ref = _ld(model, ps), _ld(model, ps, corrupted=True)
    for k in ks:
        if (base - _ld(model, ps, head_ablation_hooks(model, top[:k]))) >= 0.5 * (base - ref):
            return k
    return ks[-1]


def _ablation_figure(proof: dict):
    import plotly.graph_objects as go

    t = proof["table"]
    top, rnd = t[t.kind == "top"], t[t.kind == "random"].groupby("k")["removed"]
    fig = go.Figure([go.Bar(name="top heads (activation patching)", x=[f"k = {k}" for k in top.k], y=top.removed,
                            text=top.units, hovertemplate="%{text}: %{y:.0%} removed<extra></extra>"),
                     go.Bar(name="random heads (mean ± sd)", x=[f"k = {k}" for k in rnd.mean().index],
                            y=rnd.mean(), error_y={"type": "data", "array": rnd.std().fillna(0).tolist()})])
    fig.update_layout(title="Held-out professions: share of the she/he bias removed by zero-ablating k heads",
                      yaxis_tickformat=".0%", barmode="group", template="plotly_white")
    return fig


def _capability(models: dict, neutral: str, cloze: list[dict]):
    return compare_models(models, {"neutral_loss": lambda m: text_loss(m, neutral),
                                   "cloze_accuracy": lambda m: cloze_accuracy(m, cloze)["overall"]})


def _real_demo(model: HookedModel, out: Path, final: Path, seed: int, progress: bool) -> str:
    """The real-model demo's steps, writing into `out`; the report names `final`, where the files end up."""
    torch.manual_seed(seed)
    name = getattr(model, "lens_bias_source", "model")
    split = professions_split(model, seed)
    found = _locate_heads(model, split.locate, progress)
    ap = found["patching"]
    top = ap.units(5)
    proof = _ablation_proof(model, split.test, top, seed=seed)
    k = _choose_k(model, split.locate, top)
    pruned = prune_heads(model, top[:k])
    after = _ld(pruned.model, split.test)
    neutral = "\n".join(text_lines(default_neutral_text(model))[:64])
    cloze = [json.loads(line) for line in data_path("cloze").read_text().splitlines()]
    cap = _capability({"original": model, "pruned": pruned.model}, neutral, cloze)
    exported = export_model(pruned.model, out / "model-pruned", overwrite=True)
    diff = json.loads((exported / "lens_bias_export.json").read_text())["max_abs_logit_diff"]
    save_edit(pruned.edit, out / "prune_edit.safetensors")
    _write_real(out, found, proof, cap)
    return _real_report(out, final, name, split, found, proof, k, top, after, cap, diff)


def _write_real(out: Path, found: dict, proof: dict, cap) -> None:
    save_figure(heatmap(found["patching"], title="Activation patching: every head (layer × head), share of the "
                                                 "she/he bias it restores"), out / "patching_heads.html")
    save_figure(heatmap(found["attribution"], title="Attribution patching: every head (one forward + backward)"),
                out / "attribution_heads.html")
    save_figure(_ablation_figure(proof), out / "ablation_proof.html")
    write_table(out / "heads", found["table"])
    write_table(out / "ablation_proof", proof["table"])
    write_table(out / "before_after", cap)


def _real_report(out, final, name, split, found, proof, k, top, after, cap, diff) -> str:
    ap, agree, t = found["patching"], found["agreement"], proof["table"]
    rnd = t[t.kind == "random"].groupby("k")["removed"]
    v = cap.pivot(index="measure", columns="model", values="value")
    model_row = next((e for e in MODELS.values() if str(converted_dir(e.name)) == str(name)), None)
    lines = [f"lens_bias demo — {model_row.hub_id if model_row else name}"
             + (f" ({model_row.note})" if model_row else ""), ""]
    f_loc, f_test = split.professions
    lines += [
        f"The bias: after a female-stereotyped profession the model prefers ' she' to ' he' — logit(' she') − "
        f"logit(' he') = {proof['bias']:+.2f} on {len(split.test)} held-out prompts ({', '.join(f_test[:4])}, …), "
        f"{proof['reference']:+.2f} when a neutral profession takes its place.",
        f"Where: activation patching of all {ap.values.numel()} attention heads on {len(split.locate)} other prompts "
        f"({', '.join(f_loc[:4])}, …) finds it in a few heads — patching one head from the stereotyped prompt into "
        "its twin restores " + ", ".join(f"{ap.normalized[u]:.0%} of the gap ({_label(u)})" for u in top[:3])
        + f"; attribution patching (one forward + backward) agrees: Spearman {agree['spearman']:.2f} over heads, "
        f"{found['overlap5']} of its top 5 are the same.",
        "Proof, on the held-out prompts: " + "; ".join(
            f"zero-ablating the top {kk} ({' '.join(t[(t.kind == 'top') & (t.k == kk)].units)}) removes "
            f"{float(t[(t.kind == 'top') & (t.k == kk)].removed.iloc[0]):.0%} of the excess bias, {kk} random "
            f"head{'s' * (kk > 1)} {rnd.mean()[kk]:.0%} ± {rnd.std()[kk]:.0%} (mean ± sd of {rnd.size()[kk]} draws)"
            for kk in sorted(int(k) for k in t.k.unique())) + " (above 100%: the ablated model leans the other way).",
        f"Mitigation: pruning the top {k} head{'s' * (k > 1)} ({', '.join(map(_label, top[:k]))}: "
        f"{'their' if k > 1 else 'its'} W_O rows set to zero, a weight edit; k chosen on the locate prompts) takes the held-out bias from "
        f"{proof['bias']:+.2f} to {after:+.2f} (twins: {proof['reference']:+.2f}).",
        f"Capability: loss on 64 lines of real English (Brown corpus) {v.loc['neutral_loss', 'original']:.3f} → "
        f"{v.loc['neutral_loss', 'pruned']:.3f} nats/token "
        f"({v.loc['neutral_loss', 'pruned'] - v.loc['neutral_loss', 'original']:+.4f}); cloze accuracy {v.loc['cloze_accuracy', 'original']:.2f}"
        f" → {v.loc['cloze_accuracy', 'pruned']:.2f}.",
        f"Export: model-pruned/ is a Hugging Face directory (transformers reloads it: max |Δlogit| {diff:.1e}); "
        "prune_edit.safetensors holds only the changed weights.",
        "", f"figures (patching_heads.html, attribution_heads.html, ablation_proof.html) and tables: {final.resolve()}",
    ]
    report = "\n".join(lines)
    write_text(out / "report.txt", report + "\n")
    return report
