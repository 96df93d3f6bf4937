"""`lens-bias demo`: locate → mitigate → verify → export on the shipped model organism, offline.

The same calls a notebook makes: gender bias located by activation patching, attribution
patching and causal tracing, removed by pruning and by an LSDM weight edit that is exported as
a Hugging Face directory; the negative head located by NAS and ablated; each step checked
against the organism's recorded ground truth. Figures (HTML) and tables (CSV) go to `out`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.files import check_output_dir, move_into, write_table, write_text
from ..core.hooks import device_of
from ..core.metrics import answer_logits_fast
from ..core.models import HookedModel, load_model
from ..core.prompts import PromptSet
from ..core.viz import heatmap, save_figure
from ..locate.attribution import attribution_patching
from ..locate.nas import nas_heatmap, negative_attention_scores
from ..locate.patching import activation_patching
from ..locate.tracing import causal_trace, trace_sites
from ..mitigate.ablation import head_ablation_hooks, neuron_ablation_hooks
from ..mitigate.edits import save_edit
from ..mitigate.export import export_model
from ..mitigate.lsdm import lsdm_edit
from ..organism import data_path, load_card
from ..tasks.capability import bias_values, cloze_accuracy, compare_models, text_loss
from ..tasks.gender import professions_prompts
from ..tasks.yesno import binary_prompts, evaluate_binary, load_yes_no


def gender_pairs(model: HookedModel, card: dict, templates: int = 3) -> PromptSet:
    """Stereotyped-occupation prompts, corrupted by a neutral occupation (same length)."""
    g = card["planted"]["gender_neuron"]
    return professions_prompts(model, g["occupations"], g["templates"][:templates], answers=(" she", " he"),
                               corrupt_with=g["neutral_occupations"])


def run_demo(out: Path = Path("lens-bias-out"), device=None, dtype=None, seed: int = 0, progress: bool = False,
             overwrite: bool = False) -> str:
    """Run the demo into `out` (refused when it holds files, unless `overwrite`); returns the report.

    The files are written to a temporary sibling folder and moved into `out` when all are done, so a
    failed or killed demo leaves `out` as it was."""
    out = check_output_dir(out, overwrite)
    model = load_model("organism", device=device, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report = _demo(model, work, out, seed, progress)
        move_into(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
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
    traced = causal_trace(model, said, sites=("mlp_out",), seed=seed, progress=progress)["mlp_out"]
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
        f"  causal tracing: top MLP = layer {traced.argmax()[0]} (planted: layer {g['layer']})",
    ]
    # ---- mitigate: prune the neuron (hook ablation), verify ------------------------------
    dev = device_of(model)
    s = said.to(dev)
    with torch.no_grad():
        a = answer_logits_fast(model, s.tokens, s.answer_pos, s.answer_ids, neuron_ablation_hooks(model, [found]))
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
    lsdm = lsdm_edit(model, edit_set, neutral, layers=[int(site["layer"])], position=str(site["position"]),
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
