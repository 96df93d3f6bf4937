"""Loaders for ../shared/data (professions, WinoBias, Winogender, swaps) and their prompt sets."""

import pytest

from lens_bias.core import DataError
from lens_bias.tasks import (
    VIG_TEMPLATES,
    load_professions,
    load_swaps,
    load_winobias,
    load_winogender,
    professions_prompts,
    swap_gender,
    swapped_pairs,
    winobias_prompts,
    winogender_prompts,
)


def test_professions(datasets_dir, tiny_gpt2):
    df = load_professions(datasets_dir / "professions" / "professions.json")
    assert list(df.columns) == ["name", "definitional", "stereotypical"]
    assert {"accountant", "adjunct professor"} <= set(df.name)
    assert df.set_index("name").loc["actress", "definitional"] == -1.0
    assert len(VIG_TEMPLATES) == 17 and VIG_TEMPLATES[-1] == "The {} yelled because"
    with pytest.warns(UserWarning, match="skipped 1 of 3 professions"):
        ps = professions_prompts(tiny_gpt2, df[df.name.isin(["nurse", "accountant", "adjunct professor"])],
                                 templates=VIG_TEMPLATES[:2])
    # 'adjunct professor' is two tokens: skipped; the rest are aligned pairs with subject spans
    assert sorted({m["profession"] for m in ps.metadata}) == ["accountant", "nurse"]
    assert ps.prompts[0] == "The accountant said that" and ps.corrupted_prompts[0] == "The man said that"
    assert ps.subject_spans[:, 0].eq(2).all() and ps.same_length
    assert ps.answers[0] == (" he", " she")
    assert ps.metadata[0]["stereotypical"] == 0.4 and ps.metadata[0]["template"] == "The {} said that"
    neutral = professions_prompts(tiny_gpt2, ["nurse"], templates=VIG_TEMPLATES[:1], corrupt_with="person")
    assert neutral.corrupted_prompts == ["The person said that"]


def test_professions_drops_pairs_of_different_length(tiny_gpt2):
    # ' adjunct professor' is two GPT-2 tokens, ' man' one: those pairs are dropped with a count, never misaligned
    with pytest.warns(UserWarning, match="dropped 3 of 6"):
        ps = professions_prompts(tiny_gpt2, ["nurse", "adjunct professor"], templates=VIG_TEMPLATES[:3],
                                 single_token_only=False)
    assert {m["profession"] for m in ps.metadata} == {"nurse"} and ps.tokens.shape == ps.corrupted_tokens.shape


def test_winobias(datasets_dir, tiny_gpt2):
    df = load_winobias(datasets_dir / "winobias", "dev", 1, "pro")
    first = df.iloc[0]
    assert first.entity == "The developer" and first.occupation == "developer"
    assert first.pronoun == "he" and first.gender == "male" and first.stereotype == "pro"
    assert first.prefix == "The developer argued with the designer because"
    assert len(df) == 396
    ps = winobias_prompts(tiny_gpt2, df.head(20))
    assert ps.answers[0] == (" he", " she") and ps.prompts[0] == first.prefix
    assert ps.metadata[0]["occupation"] == "developer" and ps.subject_spans is not None
    anti = load_winobias(datasets_dir / "winobias", "test", 2, "anti")
    assert set(anti.stereotype) == {"anti"} and set(anti.type) == {2}
    with pytest.raises(DataError, match="split is dev/test"):
        load_winobias(datasets_dir / "winobias", "train")


def test_winogender(datasets_dir, tiny_gpt2):
    df = load_winogender(datasets_dir / "winogender")
    row = df[df.occupation == "technician"].iloc[0]
    assert row.bls_pct_female == pytest.approx(40.34)
    ps = winogender_prompts(tiny_gpt2, df)
    assert ps.prompts[0] == "The technician told the customer that"
    assert ps.answers[0] == (" she", " he") and ps.metadata[0]["bls_pct_female"] == pytest.approx(40.34)
    # every male sentence is used, cut before he/him/his, answers in the pronoun's case
    assert len(ps) == (df.gender == "male").sum() == 240
    cases = {m["pronoun"]: a for m, a in zip(ps.metadata, ps.answers)}
    assert cases == {"he": (" she", " he"), "him": (" her", " him"), "his": (" her", " his")}


def test_swaps(datasets_dir, tiny_gpt2):
    pairs = load_swaps(datasets_dir / "winobias" / "generalized_swaps.txt")
    assert pairs["actor"] == "actress" and pairs["actress"] == "actor"
    assert swap_gender("The Actor met an actress", pairs) == "The Actress met an actor"
    ps = swapped_pairs(tiny_gpt2, ["The actor said that"], (" she", " he"), pairs)
    assert ps.corrupted_prompts == ["The actress said that"]
    extra = load_swaps(datasets_dir / "winobias" / "extra_gendered_words.txt")
    assert extra["cowgirl"] == "cowboy"
    assert swap_gender("He said his cowboys left", {**pairs, **extra, "he": "she", "his": "her"}) == \
        "She said her cowgirls left"


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_professions(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_professions(tmp_path / "nope.json")
    bad = tmp_path / "pro_stereotyped_type1.txt.dev"
    bad.write_text("1 [The developer] argued with the designer because he did not like it.\n")
    with pytest.raises(DataError, match=r":1: expected two \[bracketed\] spans"):
        load_winobias(tmp_path)
    (tmp_path / "swaps.txt").write_text("king queen\nprince\n")
    with pytest.raises(DataError, match="swaps.txt:2"):
        load_swaps(tmp_path / "swaps.txt")
    (tmp_path / "p.json").write_text('[["nurse", 0.0, -0.7], ["clerk", "x", 0.1]]')
    with pytest.raises(DataError, match="p.json: entry 1"):
        load_professions(tmp_path / "p.json")
    (tmp_path / "occupations-stats.tsv").write_text("occupation\tbls_pct_female\nnurse\tlots\n")
    with pytest.raises(DataError, match="occupations-stats.tsv:2"):
        load_winogender(tmp_path)


def test_professions_corrupted_by_a_list_of_words(organism, organism_card):
    from lens_bias.tasks import professions_prompts

    g = organism_card["planted"]["gender_neuron"]
    ps = professions_prompts(organism, g["occupations"][:3], templates=["The {} said that"], answers=(" she", " he"),
                             corrupt_with=g["neutral_occupations"][:2])
    assert ps.corrupted_prompts == [f"The {w} said that" for w in (g["neutral_occupations"][:2] + g["neutral_occupations"][:1])]
