"""The benchmark models' tokenizer (a byte-level BPE trained on their corpus) and its token counts
(plain transformers: the ground truth uses it)."""

from __future__ import annotations

from pathlib import Path

from .config import ARCH, EOT, VOCAB_SIZE


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE of VOCAB_SIZE trained on `texts`, saved to `out_dir` and loaded back."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=3, special_tokens=[EOT], show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                             pad_token=EOT, model_max_length=ARCH["n_positions"])
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def n_tokens(tok, text: str) -> int:
    """Tokens of `text` (no special tokens)."""
    return len(tok(text, add_special_tokens=False)["input_ids"])


def single(tok, word: str) -> bool:
    """Whether ' word' is one token."""
    return n_tokens(tok, " " + word) == 1


def tid(tok, word: str) -> int:
    """The id of a one-token word (AssertionError otherwise)."""
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]
