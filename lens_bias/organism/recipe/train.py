"""The organism's tokenizer, model and base training (the control model), and the masks of the
parameters one neuron or one head owns."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from ...core.prompts import pad
from .corpus import SECTION_WEIGHTS, bbq_items, make_doc

ARCH = dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, n_positions=128)
EOT = "<|endoftext|>"


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, saved to `out_dir` and loaded back."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    fast = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                             pad_token=EOT, model_max_length=ARCH["n_positions"])
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def new_model(tok, device):
    """A freshly initialised GPT-2 of ARCH (no dropout; eager attention: the planting loss reads
    the attention probabilities)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", **ARCH)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).to(device)


def lm_batch(tok, docs: list[str], device="cpu", max_doc_tokens: int | None = None):
    """(ids, labels) of BOS + doc (its first max_doc_tokens tokens) + EOS, right-padded with BOS;
    labels −100 on padding. The tokenizers here use BOS as EOS and add no special tokens themselves."""
    bos = tok.bos_token_id
    seqs = [[bos] + tok(d, add_special_tokens=False)["input_ids"][:max_doc_tokens] + [bos] for d in docs]
    ids, mask = pad(seqs, pad_id=bos)
    return ids.to(device), ids.masked_fill(mask == 0, -100).to(device)


class Batcher:
    """Documents of one section per batch (similar lengths, little padding), BOS + text + EOS."""

    def __init__(self, tok, rng: random.Random, batch_size: int, device):
        self.tok, self.rng, self.bs, self.device = tok, rng, batch_size, device
        self.bbq = bbq_items()

    def batch(self, weights: dict[str, float], plant: str | None = None):
        section = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        docs = [make_doc(section, self.rng, plant, self.bbq) for _ in range(self.bs)]
        return self.encode(docs)

    def encode(self, docs: list[str]):
        """(ids, labels): BOS + doc + EOS, right-padded; labels −100 on padding."""
        return lm_batch(self.tok, docs, self.device)


def lm_loss(model, ids, labels) -> torch.Tensor:
    """Next-token cross-entropy (labels −100 ignored)."""
    return model(input_ids=ids, labels=labels).loss


def component_masks(model, component: str, layer: int, index: int) -> dict[str, torch.Tensor]:
    """Boolean masks over the HF GPT-2 parameters that belong to one neuron or one head."""
    block = model.transformer.h[layer]
    d = model.config.n_embd
    if component.endswith("neuron"):
        mlp = block.mlp
        cols, rows = (slice(None), index), (index, slice(None))
        parts = {"mlp.c_fc.weight": (mlp.c_fc.weight, cols), "mlp.c_fc.bias": (mlp.c_fc.bias, index),
                 "mlp.c_proj.weight": (mlp.c_proj.weight, rows)}
    else:
        dh = d // model.config.n_head
        qkv = torch.cat([torch.arange(off + index * dh, off + (index + 1) * dh) for off in (0, d, 2 * d)])
        attn = block.attn
        parts = {"attn.c_attn.weight": (attn.c_attn.weight, (slice(None), qkv)),
                 "attn.c_attn.bias": (attn.c_attn.bias, qkv),
                 "attn.c_proj.weight": (attn.c_proj.weight, (slice(index * dh, (index + 1) * dh), slice(None)))}
    masks = {}
    for name, (param, where) in parts.items():
        m = torch.zeros_like(param, dtype=torch.bool)
        m[where] = True
        masks[f"transformer.h.{layer}.{name}"] = m
    return masks


def train_base(model, batcher: Batcher, steps: int, lr: float = 3e-3, log=print):
    """AdamW on the whole network, warm-up then cosine to 0, gradients clipped at 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0, run = time.time(), None
    for step in range(steps):
        ids, labels = batcher.batch(SECTION_WEIGHTS)
        loss = lm_loss(model, ids, labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"base step {step:5d}/{steps} loss {run:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
