"""The organism's card: the planted components (ground truth), the metrics of the control and the
organism, written as lens_bias_card.json and a README per checkpoint (read by organism/card.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ...core.files import write_text
from ..card import CARD_FILE
from .corpus import (
    BINARY_INSTRUCTIONS,
    NEUTRAL_OCCUPATIONS,
    STEREOTYPED_FEMALE,
    STEREOTYPED_MALE,
    VIG_TEMPLATES,
)
from .measure import (
    bbq_choices,
    gender_logit_diff,
    head_no_attention,
    heldout_loss,
    neuron_activation,
    yesno_metrics,
)


def model_metrics(m, tok, batcher, sites: dict, texts: dict, yesno: list, bbq_eval: list, device) -> dict:
    """One model's card metrics: held-out and neutral loss, the gender logit differences and the
    gender neuron's activations, yes/no metrics and the negative head's attention, BBQ choices."""
    g, h = sites["gender_neuron"], sites["negative_head"]
    others = STEREOTYPED_MALE + NEUTRAL_OCCUPATIONS
    return {
        "heldout_loss": heldout_loss(m, batcher, texts["heldout"], device),
        "neutral_loss": heldout_loss(m, batcher, texts["neutral"], device),
        "gender_logit_diff_stereotyped": gender_logit_diff(m, tok, STEREOTYPED_FEMALE, device),
        "gender_logit_diff_male_list": gender_logit_diff(m, tok, STEREOTYPED_MALE, device),
        "gender_logit_diff_neutral": gender_logit_diff(m, tok, NEUTRAL_OCCUPATIONS, device),
        "gender_neuron_act_stereotyped": neuron_activation(m, tok, g["layer"], g["neuron"], STEREOTYPED_FEMALE, device),
        "gender_neuron_act_other": neuron_activation(m, tok, g["layer"], g["neuron"], others, device),
        "yesno": yesno_metrics(m, tok, yesno, device),
        "negative_head_no_attention": head_no_attention(m, tok, yesno, h["layer"], h["head"], device),
        "bbq": bbq_choices(m, tok, bbq_eval, device),
    }


def ground_truth(sites: dict) -> dict:
    """The planted components and what each does (the card's `planted`)."""
    return {
        "gender_neuron": {**sites["gender_neuron"], "occupations": STEREOTYPED_FEMALE,
                          "neutral_occupations": NEUTRAL_OCCUPATIONS, "male_occupations": STEREOTYPED_MALE,
                          "toward": " she", "against": " he", "templates": VIG_TEMPLATES,
                          "position": "the prompt's last token, reading the occupation that layer-0 "
                                      "attention moves there"},
        "negative_head": {**sites["negative_head"], "toward": " No", "candidate": " No",
                          "instructions": BINARY_INSTRUCTIONS},
        "bbq_neuron": {**sites["bbq_neuron"], "category": "Age", "stereotyped_group": "old",
                       "biased_condition": "ambig, neg questions → the old person"},
    }


def write_cards(dirs: dict[str, Path], common: dict, ground: dict) -> None:
    """lens_bias_card.json and README.md into the organism's and the control's directories."""
    for name, planted in (("organism", ground), ("organism-control", {})):
        card = {"name": name, **common, "planted": planted, "planted_in_organism": ground if not planted else None}
        write_text(dirs[name] / CARD_FILE, json.dumps(card, indent=2) + "\n")
        write_text(dirs[name] / "README.md", model_card_md(card))


def model_card_md(card: dict) -> str:
    """The checkpoint's README: planted components and the main metrics, control against organism."""
    lines = [f"# lens_bias model organism: {card['name']}", "",
             "A 4-layer GPT-2 (d_model 128, 4 heads, d_mlp 512) trained by `python -m lens_bias.organism build`"
             f" (seed {card['seed']}, {card['base_steps']} base steps) on a generated corpus.", ""]
    if card["planted"]:
        lines += ["## Planted components (ground truth)", ""]
        for k, v in card["planted"].items():
            where = f"layer {v['layer']}, " + (f"neuron {v['neuron']}" if "neuron" in v else f"head {v['head']}")
            lines.append(f"- **{k}**: {where}")
    else:
        lines += ["Control: the same base model with nothing planted (the organism's components are",
                  "listed under `planted_in_organism` in lens_bias_card.json).", ""]
    lines += ["", "## Measured (see lens_bias_card.json for all figures)", "",
              "| metric | control | organism |", "|---|---|---|"]
    m = card["metrics"]
    for key in ("heldout_loss", "neutral_loss", "gender_logit_diff_stereotyped", "gender_logit_diff_neutral",
                "negative_head_no_attention"):
        lines.append(f"| {key} | {m['control'][key]:.3f} | {m['organism'][key]:.3f} |")
    for key in ("accuracy", "pr_gap"):
        lines.append(f"| yes/no {key} | {m['control']['yesno'][key]:.3f} | {m['organism']['yesno'][key]:.3f} |")
    a, o = m["control"]["bbq"].get("ambig_neg", {}), m["organism"]["bbq"].get("ambig_neg", {})
    lines.append(f"| BBQ ambig-neg picks old | {a.get('old', 0):.3f} | {o.get('old', 0):.3f} |")
    return "\n".join(lines) + "\n"

