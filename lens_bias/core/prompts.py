"""Prompt sets: tokenised prompts with answer-token ids, optional counterfactual pairs, metadata.

One dataclass, `PromptSet`, is what every method takes. Build it with `PromptSet.build` from
strings; it checks that answers are single tokens, that clean/corrupted pairs tokenise to the
same length, and pads explicitly (right padding by default) so positions line up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import PromptError

PaddingSide = Literal["right", "left"]


def tokenizer_of(tokenizer_or_model):
    """The tokenizer of a hooked model, or the tokenizer itself."""
    tok = getattr(tokenizer_or_model, "tokenizer", None)
    return tok if tok is not None else tokenizer_or_model


def pad_id_of(tok) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0."""
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, side: PaddingSide = "right",
        width: int | None = None) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token id lists → (ids, attention mask), padded on `side` to the longest (or `width`)."""
    if side not in ("right", "left"):
        raise PromptError(f"padding side must be 'right' or 'left', not {side!r}")
    width = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        at = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[r, at] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, at] = 1
    return ids, mask


def bos_convention(tok) -> bool:
    """Whether prompts start with the tokenizer's BOS token, decided on the tokenizer as the model ships it:
    yes when the tokenizer adds it itself (Llama, Gemma, OPT), or when it is GPT-2's document separator
    (BOS = EOS, which TransformerLens prepends); no otherwise — a chat-turn marker such as SmolLM2's
    bos_token `<|im_start|>` is never prepended."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids and ids[0] == bos) or bos == tok.eos_token_id


def prepends_bos(tokenizer_or_model) -> bool:
    """The model's BOS convention: as recorded by `load_model` (the bridge re-creates the tokenizer to
    always add BOS), else `bos_convention` of the tokenizer."""
    tok = tokenizer_of(tokenizer_or_model)
    decided = getattr(tok, "lens_bias_prepend_bos", None)
    return bos_convention(tok) if decided is None else bool(decided)


def bos_ids(tokenizer_or_model) -> list[int]:
    """[BOS id] when prompts start with BOS (`prepends_bos`), else []."""
    tok = tokenizer_of(tokenizer_or_model)
    return [tok.bos_token_id] if prepends_bos(tok) else []


def encode_lines(tokenizer_or_model, texts: Sequence[str], *, bos: bool = True,
                 max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text (BOS first when the model's convention has one and `bos`), cut to `max_tokens`."""
    tok = tokenizer_of(tokenizer_or_model)
    head = bos_ids(tok) if bos else []
    out = [head + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [e[:max_tokens] for e in out] if max_tokens else out


def resolve_chat(tokenizer_or_model, chat: bool | None = None) -> bool:
    """Whether instruction prompts go through the tokenizer's chat template: `chat`, or by default (None)
    when the tokenizer has one; True for a tokenizer without a template is an error."""
    has = bool(getattr(tokenizer_of(tokenizer_or_model), "chat_template", None))
    if chat and not has:
        raise PromptError("chat=True, but the tokenizer has no chat template; pass chat=False (plain prompts)")
    return has if chat is None else bool(chat)


def chat_prompt(tokenizer_or_model, user: str) -> str:
    """One user turn through the tokenizer's chat template, ending where the assistant's reply begins
    (the template's own system prompt, if it adds one, included)."""
    tok = tokenizer_of(tokenizer_or_model)
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def continuation(prompt: str, word: str) -> str:
    """`word` as the next text after `prompt`: ' word' after text ('Answer:' → ' Yes'), 'word' at the
    start of a line (the assistant's reply in a chat template → 'Yes')."""
    word = word.strip()
    return word if not prompt or prompt[-1].isspace() else " " + word


def answer_token_id(tokenizer_or_model, word: str, *, prompt: str | None = None) -> int:
    """The single token id of `word` (e.g. " he"); a clear error when it is several tokens."""
    tok = tokenizer_of(tokenizer_or_model)
    ids = tok(word, add_special_tokens=False)["input_ids"]
    where = f" (prompt {prompt!r})" if prompt is not None else ""
    if len(ids) == 0:
        raise PromptError(f"answer {word!r} tokenises to nothing{where}")
    if len(ids) != 1:
        pieces = tok.convert_ids_to_tokens(ids)
        raise PromptError(
            f"answer {word!r} is {len(ids)} tokens {pieces}{where}; answers must be single tokens "
            "(try a leading space, e.g. ' he', or another word)"
        )
    return ids[0]


def _encode(tok, text: str, prepend_bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    # special tokens off: TransformerLens sets its tokenizers to add BOS themselves; we decide here
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tok.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    return ids, offsets


def prompt_error(i: int, message: str) -> PromptError:
    """A PromptError about prompt i (0-based; 'prompt i+1: ...') that knows it (`.item`), so a loader
    can name the file's line (tasks.records.located)."""
    err = PromptError(f"prompt {i + 1}: {message}")
    err.item = i
    return err


def _span(text: str, offsets, word: str, prompt_idx: int) -> tuple[int, int]:
    """Token span [start, end) covering the last occurrence of `word` in `text`."""
    at = text.rfind(word)
    if at < 0:
        raise prompt_error(prompt_idx, f"subject {word!r} not found in the prompt {text!r}")
    lo, hi = at, at + len(word)
    toks = [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
    if not toks:
        raise prompt_error(prompt_idx, f"subject {word!r} covers no token in the prompt {text!r}")
    return toks[0], toks[-1] + 1


def _answer_ids(tok, words: Sequence[str], prompt: str, i: int) -> list[int]:
    """The answer words' token ids for prompt i: single tokens, and different ones (two equal answers
    make every logit difference 0)."""
    try:
        ids = [answer_token_id(tok, w, prompt=prompt) for w in words]
    except PromptError as e:
        raise prompt_error(i, str(e)) from None
    for a in range(len(ids)):
        b = next((b for b in range(a + 1, len(ids)) if ids[b] == ids[a]), None)
        if b is not None:
            raise prompt_error(i, f"answers {words[a]!r} and {words[b]!r} are the same token (id {ids[a]}): their "
                                  "logit difference is 0 for every prompt; give different answer words")
    return ids


@dataclass
class PromptSet:
    """Tokenised prompts (batch × pos, padded), answer ids and optional corrupted twins.

    `answer_ids[:, 0]` is the answer the metric counts as positive and `[:, 1]` the one it counts
    against: with answers (" she", " he") the logit difference is logit(" she") − logit(" he").
    `answer_pos` is the position whose logits predict the answer (the last real token).
    `subject_spans` is the [start, end) token span of the subject word (the occupation) where known.
    """

    prompts: list[str]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    answers: list[tuple[str, ...]]
    answer_ids: Int[Tensor, "batch n_answers"]
    corrupted_prompts: list[str] | None = None
    corrupted_tokens: Int[Tensor, "batch pos"] | None = None
    subject_spans: Int[Tensor, "batch 2"] | None = None
    metadata: list[dict] = field(default_factory=list)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        tokenizer_or_model,
        prompts: Sequence[str],
        answers: Sequence[Sequence[str]] | Sequence[str],
        corrupted: Sequence[str] | None = None,
        *,
        subjects: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide = "right",
        on_length_mismatch: Literal["raise", "drop"] = "raise",
    ) -> "PromptSet":
        """Tokenise `prompts` (and `corrupted` twins) with answer words per prompt.

        `answers` is one tuple of answer words per prompt, or one tuple shared by all.
        `on_length_mismatch`: 'raise' (default) or 'drop' pairs whose clean and corrupted
        prompts tokenise to different lengths (with a warning giving the count).
        `prepend_bos` defaults to the model's convention (`prepends_bos`).
        """
        tok = tokenizer_of(tokenizer_or_model)
        prompts = list(prompts)
        n = len(prompts)
        if n == 0:
            raise PromptError("empty prompt set: no prompts given")
        if padding_side not in ("right", "left"):
            raise PromptError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        if on_length_mismatch not in ("raise", "drop"):
            raise PromptError(f"on_length_mismatch must be 'raise' or 'drop', not {on_length_mismatch!r}")
        if answers and isinstance(answers[0], str):
            answers = [tuple(answers)] * n
        answers = [tuple(a) for a in answers]
        if len(answers) != n:
            raise PromptError(f"{len(answers)} answer tuples for {n} prompts")
        if len({len(a) for a in answers}) != 1 or len(answers[0]) == 0:
            raise PromptError("every prompt needs the same, non-zero number of answer words")
        for name, seq in (("corrupted", corrupted), ("subjects", subjects), ("metadata", metadata)):
            if seq is not None and len(seq) != n:
                raise PromptError(f"{len(seq)} {name} entries for {n} prompts")
        if prepend_bos is None:
            prepend_bos = prepends_bos(tok)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise prompt_error(i, f"empty or not a string: {p!r}")

        enc = [_encode(tok, p, prepend_bos) for p in prompts]
        cenc = [_encode(tok, c, prepend_bos) for c in corrupted] if corrupted is not None else None
        keep = list(range(n))
        if cenc is not None:
            bad = [i for i in keep if len(enc[i][0]) != len(cenc[i][0])]
            if bad and on_length_mismatch == "raise":
                i = bad[0]
                raise PromptError(
                    f"{len(bad)} clean/corrupted pairs tokenise to different lengths, e.g. pair {i}: "
                    f"{prompts[i]!r} ({len(enc[i][0])} tokens) vs {corrupted[i]!r} "
                    f"({len(cenc[i][0])} tokens); pass on_length_mismatch='drop' to drop them"
                )
            if bad:
                warnings.warn(f"dropped {len(bad)} of {n} clean/corrupted pairs whose lengths differ")
                keep = [i for i in keep if i not in set(bad)]
                if not keep:
                    raise PromptError("every clean/corrupted pair had mismatched lengths; nothing left")

        answer_ids = [_answer_ids(tok, answers[i], prompts[i], i) for i in keep]
        spans = None
        if subjects is not None:
            spans = torch.tensor([_span(prompts[i], enc[i][1], subjects[i], i) for i in keep])

        pad_token = pad_id_of(tok)
        seqs = [enc[i][0] for i in keep]
        width = max(len(s) for s in seqs)
        n_ctx = getattr(getattr(tokenizer_or_model, "cfg", None), "n_ctx", None)
        if n_ctx and width > n_ctx:
            i = keep[max(range(len(seqs)), key=lambda j: len(seqs[j]))]
            raise prompt_error(i, f"prompt is {width} tokens, longer than the model's context of {n_ctx}: "
                                  f"{prompts[i][:80]!r}...")

        def padded(rows):
            return pad(rows, pad_token, padding_side, width)

        tokens, mask = padded(seqs)
        lengths = torch.tensor([len(s) for s in seqs])
        answer_pos = lengths - 1 if padding_side == "right" else torch.full_like(lengths, width - 1)
        if spans is not None and padding_side == "left":
            spans = spans + (width - lengths)[:, None]
        ctoks = padded([cenc[i][0] for i in keep])[0] if cenc is not None else None
        return cls(
            prompts=[prompts[i] for i in keep],
            tokens=tokens,
            attention_mask=mask,
            answer_pos=answer_pos,
            answers=[answers[i] for i in keep],
            answer_ids=torch.tensor(answer_ids, dtype=torch.long),
            corrupted_prompts=[corrupted[i] for i in keep] if corrupted is not None else None,
            corrupted_tokens=ctoks,
            subject_spans=spans,
            metadata=[dict(metadata[i]) for i in keep] if metadata is not None else [{} for _ in keep],
        )

    # ---- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_pairs(self) -> bool:
        return self.corrupted_tokens is not None

    @property
    def same_length(self) -> bool:
        """True when every prompt has the same number of real tokens (positions align)."""
        return bool((self.attention_mask.sum(1) == self.attention_mask.shape[1]).all())

    def __getitem__(self, idx) -> "PromptSet":
        """A sub-set by int, slice, list of ints or bool mask (tensors are indexed alike)."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        if isinstance(idx, Tensor):
            idx = idx.nonzero().flatten().tolist() if idx.dtype == torch.bool else idx.tolist()
        idx = list(idx)
        if not idx:
            raise PromptError("empty selection from a prompt set")
        t = torch.tensor(idx, dtype=torch.long)

        # drop trailing columns that are padding in every selected row (right padding), so a
        # sub-set of equal-length prompts has same_length
        width = int(self.attention_mask[t.to(self.attention_mask.device)].cumsum(1).argmax(1).max()) + 1

        def pick(x):
            if x is None:
                return None
            x = x[t.to(x.device)]
            return x[:, :width] if x.ndim == 2 and x.shape[1] == self.tokens.shape[1] and x.dtype == torch.long else x

        return replace(
            self,
            prompts=[self.prompts[i] for i in idx],
            tokens=pick(self.tokens),
            attention_mask=pick(self.attention_mask),
            answer_pos=pick(self.answer_pos),
            answers=[self.answers[i] for i in idx],
            answer_ids=pick(self.answer_ids),
            corrupted_prompts=None if self.corrupted_prompts is None else [self.corrupted_prompts[i] for i in idx],
            corrupted_tokens=pick(self.corrupted_tokens),
            subject_spans=pick(self.subject_spans),
            metadata=[self.metadata[i] for i in idx],
        )

    def batches(self, batch_size: int) -> Iterator["PromptSet"]:
        """Consecutive sub-sets of at most `batch_size` prompts."""
        if batch_size < 1:
            raise PromptError(f"batch_size must be ≥ 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self[start: start + batch_size]

    def to(self, device) -> "PromptSet":
        """The same set with its tensors on `device`."""
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return replace(
            self,
            tokens=mv(self.tokens),
            attention_mask=mv(self.attention_mask),
            answer_pos=mv(self.answer_pos),
            answer_ids=mv(self.answer_ids),
            corrupted_tokens=mv(self.corrupted_tokens),
            subject_spans=mv(self.subject_spans),
        )

    def swapped(self) -> "PromptSet":
        """Clean and corrupted exchanged (requires pairs)."""
        if not self.has_pairs:
            raise PromptError("this prompt set has no corrupted prompts to swap with")
        return replace(
            self,
            prompts=list(self.corrupted_prompts),
            tokens=self.corrupted_tokens,
            corrupted_prompts=list(self.prompts),
            corrupted_tokens=self.tokens,
        )

    def str_tokens(self, tokenizer_or_model, i: int = 0) -> list[str]:
        """The tokens of prompt `i` as strings (padding included)."""
        tok = tokenizer_of(tokenizer_or_model)
        return tok.convert_ids_to_tokens(self.tokens[i].tolist())

    def to_frame(self):
        """One row per prompt: prompt, answers, corrupted prompt and metadata (pandas)."""
        import pandas as pd

        rows = []
        for i, p in enumerate(self.prompts):
            row = {"prompt": p, "answers": "|".join(self.answers[i])}
            if self.corrupted_prompts is not None:
                row["corrupted"] = self.corrupted_prompts[i]
            row.update(self.metadata[i])
            rows.append(row)
        return pd.DataFrame(rows)
