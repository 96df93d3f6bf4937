"""Training the benchmark models: phase A (the whole network on the designed corpus, resumable) and
the restricted, norm-capped training of chosen units (phase B's plants)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.files import atomic_write
from .config import ARCH, CKPT_SECONDS, TOKENS_PER_STEP
from .forward import Hooks, dh, zero_head


def new_model(tok):
    """A freshly initialised GPT-2 of ARCH (no dropout, eager attention) for tokenizer `tok`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", **ARCH)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def lm_loss(model, ids, labels):
    """Next-token cross-entropy, padding (label −100) ignored."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def save_checkpoint(obj, path: Path) -> None:
    """torch.save to a temp name, then rename (core.files.atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def phase_a_optimizer(model, lr: float):
    """AdamW, weight decay 0.05 on matrices only."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    nodecay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def phase_a_lr(step: int, steps: int, lr: float) -> float:
    """Linear warm-up (5%, at most 200 steps), then cosine from lr down to lr/10."""
    warm = max(1, min(200, steps // 20))
    return lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def train_phase_a(model, corpus, steps: int, work: Path, log, lr: float = 2e-3) -> dict:
    """Whole-network training, resumable from work/phaseA_ckpt.pt."""
    ckpt = work / "phaseA_ckpt.pt"
    opt = phase_a_optimizer(model, lr)
    start, elapsed, run, hist = 0, 0.0, None, []
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, elapsed, run, hist = st["step"], st["elapsed"], st["run"], st["hist"]
        log(f"phase A: resuming at step {start}/{steps} ({elapsed:.0f}s done)")
    model.train()
    t0, last_ck = time.time(), time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = phase_a_lr(step, steps, lr)
        ids, labels = corpus.batch(step)
        loss = lm_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            hist.append((step, round(run, 4)))
            log(f"phase A {corpus.name} step {step:5d}/{steps} loss {run:.3f} "
                f"({elapsed + time.time() - t0:.0f}s, {ids.numel()} tok)")
        if time.time() - last_ck > CKPT_SECONDS and step < steps - 1:
            save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                             "elapsed": elapsed + time.time() - t0, "run": run, "hist": hist}, ckpt)
            last_ck = time.time()
    model.eval()
    return {"steps": steps, "seconds": round(elapsed + time.time() - t0, 1), "final_train_loss": run,
            "loss_history": hist, "lr": lr, "tokens_per_step": TOKENS_PER_STEP}


# ---------------------------------------------------------------------------------------
# Weight norms (the weight-norm baseline the planted units must not stand out in; the caps)
# ---------------------------------------------------------------------------------------
def weight_norms(model) -> dict:
    """Per head: norms of its q, k, v columns and o rows [L, H]; per neuron: of its w_in column and
    w_out row [L, d_mlp]."""
    L, H, d = model.config.n_layer, model.config.n_head, dh(model)
    D = model.config.n_embd
    heads = {k: torch.zeros(L, H) for k in ("q", "k", "v", "o")}
    neurons = {k: torch.zeros(L, model.config.n_inner) for k in ("w_in", "w_out")}
    for l, blk in enumerate(model.transformer.h):
        W = blk.attn.c_attn.weight.detach()
        Wo = blk.attn.c_proj.weight.detach()
        for h in range(H):
            for j, k in enumerate("qkv"):
                heads[k][l, h] = W[:, j * D + h * d: j * D + (h + 1) * d].norm()
            heads["o"][l, h] = Wo[h * d:(h + 1) * d].norm()
        neurons["w_in"][l] = blk.mlp.c_fc.weight.detach().norm(dim=0)
        neurons["w_out"][l] = blk.mlp.c_proj.weight.detach().norm(dim=1)
    return {"heads": heads, "neurons": neurons}


def mid_norm_neurons(model, layer: int) -> list[int]:
    """Neurons of `layer` whose w_in and w_out norms both lie between the layer's 30% and 70% quantiles."""
    wn = weight_norms(model)
    win, wout = wn["neurons"]["w_in"][layer], wn["neurons"]["w_out"][layer]
    lo_i, hi_i = torch.quantile(win, 0.3), torch.quantile(win, 0.7)
    lo_o, hi_o = torch.quantile(wout, 0.3), torch.quantile(wout, 0.7)
    return [i for i in range(len(win)) if lo_i <= win[i] <= hi_i and lo_o <= wout[i] <= hi_o]


# ---------------------------------------------------------------------------------------
# Restricted, norm-capped training of chosen units (phase B)
# ---------------------------------------------------------------------------------------
def mask_of(param: torch.Tensor, index) -> torch.Tensor:
    """A boolean mask of `param`'s shape, True at `index`."""
    m = torch.zeros_like(param, dtype=torch.bool)
    m[index] = True
    return m


def neuron_slices(model, l: int, i: int) -> dict:
    """Masks over the parameters of neuron i of layer l (c_fc column and bias, c_proj row) and its norm groups."""
    mlp = model.transformer.h[l].mlp
    fc_w, fc_b, proj = (f"transformer.h.{l}.mlp.{k}" for k in ("c_fc.weight", "c_fc.bias", "c_proj.weight"))
    masks = {fc_w: mask_of(mlp.c_fc.weight, (slice(None), i)), fc_b: mask_of(mlp.c_fc.bias, i),
             proj: mask_of(mlp.c_proj.weight, (i, slice(None)))}
    return {"masks": masks, "groups": {"w_in": (fc_w, (slice(None), i)), "w_out": (proj, (i, slice(None)))}}


def head_slices(model, l: int, h: int, parts: str = "qkvo") -> dict:
    """Masks over the parameters of head h of layer l (its `parts` of q/k/v columns and o rows) and its norm groups."""
    attn = model.transformer.h[l].attn
    D, d = model.config.n_embd, dh(model)
    wn, bn, pn = (f"transformer.h.{l}.attn.{k}" for k in ("c_attn.weight", "c_attn.bias", "c_proj.weight"))
    cols = torch.cat([torch.arange(j * D + h * d, j * D + (h + 1) * d) for j, k in enumerate("qkv") if k in parts])
    masks = {wn: mask_of(attn.c_attn.weight, (slice(None), cols)), bn: mask_of(attn.c_attn.bias, cols)}
    if "o" in parts:
        masks[pn] = mask_of(attn.c_proj.weight, (slice(h * d, (h + 1) * d), slice(None)))
    groups = {k: (wn, (slice(None), slice(j * D + h * d, j * D + (h + 1) * d))) for j, k in enumerate("qkv")}
    groups["o"] = (pn, (slice(h * d, (h + 1) * d), slice(None)))
    return {"masks": masks, "groups": groups}


def unit_slices(model, unit: dict) -> dict:
    """Boolean masks over the HF parameters owned by one neuron or one head, plus the norm groups."""
    if unit["kind"] == "neuron":
        return neuron_slices(model, unit["layer"], unit["index"])
    return head_slices(model, unit["layer"], unit["index"], unit.get("parts", "qkvo"))


def set_caps(model, unit: dict, q: float):
    """Norm caps: the q-quantile of the same quantity over the unit's layer (pre-plant weights)."""
    wn = weight_norms(model)
    l = unit["layer"]
    if unit["kind"] == "neuron":
        unit["caps"] = {k: float(torch.quantile(wn["neurons"][k][l], q)) for k in ("w_in", "w_out")}
    else:
        unit["caps"] = {k: float(torch.quantile(wn["heads"][k][l], q)) for k in ("q", "k", "v", "o")}


def update_multipliers(params: dict, touched: list, sl: dict, units: list[dict], active) -> dict:
    """Per parameter entry: the update multiplier of the active unit owning it (0 elsewhere)."""
    mult = {k: torch.zeros_like(params[k]) for k in touched}
    for u in units:
        if u["name"] in active:
            for k, m in sl[u["name"]]["masks"].items():
                mult[k][m] = u.get("mult", 1.0)
    return mult


@torch.no_grad()
def apply_caps(params: dict, sl: dict, units: list[dict]) -> None:
    """Scale each unit's slice down to its norm cap."""
    for u in units:
        for g, (pk, idx) in sl[u["name"]]["groups"].items():
            cap = u["caps"].get(g)
            if cap is None:
                continue
            w = params[pk][idx]
            nrm = w.norm()
            if nrm > cap:
                params[pk][idx] = w * (cap / nrm)


def restricted_step(opt, params, touched, sl, units, loss, active) -> None:
    """One Adam step on the active units' slices, scaled by their multipliers, then the caps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mult = update_multipliers(params, touched, sl, units, active)
    old = {k: params[k].detach().clone() for k in touched}
    for k in touched:
        if params[k].grad is not None:
            params[k].grad.mul_(mult[k] > 0)
    opt.step()
    with torch.no_grad():
        for k in touched:
            params[k].copy_(old[k] + mult[k] * (params[k] - old[k]))
    apply_caps(params, sl, units)


def restricted_train(model, units: list[dict], batch_fn, steps: int, lr: float, log, name: str,
                     extra_loss=None, ablate=None, smoke: bool = False):
    """Train only the units' slices (Adam; per-unit update multiplier `mult`; after each step every
    slice is scaled down to its norm cap). batch_fn(step) → (ids, labels, active unit names or None
    for all). ablate(step) → list of (layer, head) zero-ablated in this step's forward (backup)."""
    params = dict(model.named_parameters())
    sl = {u["name"]: unit_slices(model, u) for u in units}
    touched = sorted({k for s in sl.values() for k in s["masks"]})
    for p in model.parameters():
        p.requires_grad_(False)
    for k in touched:
        params[k].requires_grad_(True)
    opt = torch.optim.Adam([params[k] for k in touched], lr=lr)
    steps = min(steps, 3) if smoke else steps
    model.train()
    t0, hist = time.time(), []
    for step in range(steps):
        ids, labels, active = batch_fn(step)
        with Hooks() as hk:
            for (l, h) in (ablate(step) if ablate else []):
                hk.pre(model.transformer.h[l].attn.c_proj, zero_head(model, h))
            loss = lm_loss(model, ids, labels)
        if extra_loss is not None:
            loss = loss + extra_loss(step)
        restricted_step(opt, params, touched, sl, units, loss, active or [u["name"] for u in units])
        if step % 50 == 0 or step == steps - 1:
            hist.append((step, round(loss.item(), 4)))
            log(f"  plant {name} step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "lr": lr, "loss_history": hist}
