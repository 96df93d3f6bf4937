"""The professions prompts sections 1 and 2 share: Vig et al.'s single-token female- and male-stereotyped
professions in templates of one length, the answers oriented (the stereotyped pronoun first), neutral
professions as counterfactual twins; professions and templates split, seeded, into a locate part and a
held-out part (no profession and no template in both)."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

from lens_bias.core import PromptSet
from lens_bias.organism import load_card
from lens_bias.tasks import VIG_TEMPLATES, load_professions


@dataclass
class ProfessionSets:
    locate: PromptSet
    held: PromptSet
    female: list[str]
    male: list[str]
    neutral: list[str]
    templates: list[str]
    source: str

    def describe(self) -> str:
        return (f"{len(self.female)} female- and {len(self.male)} male-stereotyped professions, {len(self.neutral)} "
                f"neutral twins, {len(self.templates)} templates; locate {len(self.locate)} prompts, held out "
                f"{len(self.held)} (other professions and templates); {self.source}")


def _one_token(tok, word: str) -> bool:
    return len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


def _lists(model):
    tok = model.tokenizer
    try:
        g = load_card(model)["planted"]["gender_neuron"]
        return (g["occupations"], g["male_occupations"], g["neutral_occupations"], list(g["templates"]),
                "the organism card's occupations")
    except Exception:  # noqa: BLE001 - not the organism: Vig et al.'s list
        pass
    rows = [r for r in load_professions().to_dict("records") if _one_token(tok, r["name"])]
    female = [r["name"] for r in sorted(rows, key=lambda r: r["stereotypical"])
              if r["stereotypical"] <= -0.4 and r["definitional"] > -0.3]
    male = [r["name"] for r in sorted(rows, key=lambda r: -r["stereotypical"])
            if r["stereotypical"] >= 0.4 and r["definitional"] < 0.3][: len(female)]
    neutral = [r["name"] for r in rows if r["stereotypical"] == 0 and r["definitional"] == 0]
    return female, male, neutral, list(VIG_TEMPLATES), ("Vig et al.'s professions: stereotypical ≤ −0.4 (female), the "
                                                        "as many most male-stereotyped ≥ +0.4, neutral (both scores 0)")


def _same_length(tok, templates: list[str], word: str) -> list[str]:
    groups: dict[int, list[str]] = {}
    for t in templates:
        groups.setdefault(len(tok(t.format(word), add_special_tokens=False)["input_ids"]), []).append(t)
    return max(groups.values(), key=len)


def _split(words: list[str], frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    words = list(words)
    rng.shuffle(words)
    cut = max(1, min(len(words) - 1, round(frac * len(words))))
    return words[:cut], words[cut:]


def _build(model, female, male, neutral, templates, limit: int) -> PromptSet:
    prompts, answers, corrupted, subjects, meta = [], [], [], [], []
    rows = [(p, "female") for p in female] + [(p, "male") for p in male]
    k = 0
    for t in templates:
        for prof, gender in rows:
            prompts.append(t.format(prof))
            answers.append((" she", " he") if gender == "female" else (" he", " she"))
            corrupted.append(t.format(neutral[k % len(neutral)]))
            subjects.append(prof)
            meta.append({"profession": prof, "stereotype": gender, "template": t, "twin": neutral[k % len(neutral)]})
            k += 1
    pick = list(range(min(limit, len(prompts))))  # templates in turn, every profession in each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PromptSet.build(model, [prompts[i] for i in pick], [answers[i] for i in pick],
                               [corrupted[i] for i in pick], subjects=[subjects[i] for i in pick],
                               metadata=[meta[i] for i in pick], on_length_mismatch="drop")


def profession_sets(model, locate_prompts: int, held_prompts: int, seed: int = 0) -> ProfessionSets:
    """The locate and held-out prompt sets (module docstring)."""
    female, male, neutral, templates, source = _lists(model)
    tok = model.tokenizer
    female = [w for w in female if _one_token(tok, w)]
    male = [w for w in male if _one_token(tok, w)]
    neutral = [w for w in neutral if _one_token(tok, w)]
    templates = _same_length(tok, templates, female[0])
    rng = random.Random(seed)
    f_loc, f_held = _split(female, 0.6, rng)
    m_loc, m_held = _split(male, 0.6, rng)
    t_loc, t_held = _split(templates, 0.5, rng)
    locate = _build(model, f_loc, m_loc, neutral, t_loc, locate_prompts)
    held = _build(model, f_held, m_held, neutral, t_held, held_prompts)
    return ProfessionSets(locate, held, female, male, neutral, templates, source)


STAGE = "professions"


def sizes(sets: ProfessionSets) -> dict:
    return {"locate": len(sets.locate), "held": len(sets.held), "locate_prompts": sets.locate.prompts,
            "held_prompts": sets.held.prompts}


def bias_stage(ctx, sets: ProfessionSets) -> dict:
    """LD (stereotyped − other pronoun) per prompt, clean and on the neutral twin, on both parts."""
    from lens_bias.tasks import bias_values

    def compute():
        return {name: {"clean": bias_values(ctx.model, ps).tolist(), "twin": bias_values(ctx.model, ps.swapped()).tolist()}
                for name, ps in (("locate", sets.locate), ("held", sets.held))}

    return ctx.stage(STAGE, "bias", sizes(sets), compute)


def patching_stage(ctx, sets: ProfessionSets, site: str) -> list:
    """Activation patching (clean into the neutral twin) of `site` on the locate prompts, the per-prompt patched
    LD: [layer, pos, prompt] ('head': all positions at once, [layer, head, prompt]). With counterfactual twins
    this is also causal tracing's default (`causal_trace(corruption="counterfactual")` makes the same call)."""
    import lens_bias as lb

    def compute():
        r = lb.activation_patching(ctx.model, sets.locate, site, per_position=site != "head", progress=ctx.progress)
        return r.extra["per_prompt"].tolist()

    return ctx.stage(STAGE, f"patching-{site}", sizes(sets), compute)
