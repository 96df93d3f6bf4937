"""Loaders for ../shared/data (professions, WinoBias, Winogender, swaps) and their prompt sets."""

import pytest

from lens_bias.data import (VIG_TEMPLATES, load_professions, load_swaps, load_winobias, load_winogender,
                            professions_prompts, swap_gender, swapped_pairs, winobias_prompts, winogender_prompts)
from lens_bias.errors import DataError


def test_professions(shared_data, tiny_gpt2):
    df = load_professions(shared_data / "professions" / "professions.json")
    assert {"accountant", "adjunct professor"} <= set(df.profession)
    assert df.set_index("profession").loc["actress", "definitional"] == -1.0
    ps = professions_prompts(tiny_gpt2, df[df.profession.isin(["nurse", "accountant", "adjunct professor"])],
                             templates=VIG_TEMPLATES[:2])
    # 'adjunct professor' is two tokens: skipped; the rest are aligned pairs with subject spans
    assert sorted({m["profession"] for m in ps.metadata}) == ["accountant", "nurse"]
    assert ps.prompts[0] == "The accountant said that" and ps.corrupted_prompts[0] == "The man said that"
    assert ps.subject_spans[:, 0].eq(2).all() and ps.same_length


def test_winobias(shared_data, tiny_gpt2):
    df = load_winobias(shared_data / "winobias", "dev", 1, "pro")
    first = df.iloc[0]
    assert first.entity == "The developer" and first.pronoun == "he" and first.gender == "male"
    assert first.prefix == "The developer argued with the designer because"
    assert len(df) == 396
    ps = winobias_prompts(tiny_gpt2, df.head(20))
    assert ps.answers[0] == (" he", " she") and ps.prompts[0] == first.prefix


def test_winogender(shared_data, tiny_gpt2):
    df = load_winogender(shared_data / "winogender")
    row = df[df.occupation == "technician"].iloc[0]
    assert row.bls_pct_female == pytest.approx(40.34)
    ps = winogender_prompts(tiny_gpt2, df)
    assert ps.prompts[0] == "The technician told the customer that"
    assert all(" he" not in p.split()[-1:] for p in ps.prompts)


def test_swaps(shared_data, tiny_gpt2):
    pairs = load_swaps(shared_data / "winobias" / "generalized_swaps.txt")
    assert pairs["actor"] == "actress" and pairs["actress"] == "actor"
    assert swap_gender("The Actor met an actress", pairs) == "The Actress met an actor"
    ps = swapped_pairs(tiny_gpt2, ["The actor said that"], (" she", " he"), pairs)
    assert ps.corrupted_prompts == ["The actress said that"]


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
