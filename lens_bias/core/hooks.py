"""The one component vocabulary and the small hook library every method uses.

A *site* names a kind of activation; `hook_name(site, layer)` is the TransformerLens hook that
carries it (TransformerLens' `get_act_name` plays this role there). Every method, result table,
CLI option and ablation speaks these names — nothing else writes a `blocks.{…}` string.

| site | hook | shape |
|---|---|---|
| resid_pre / resid_mid / resid_post | blocks.L.hook_resid_* | [batch, pos, d_model] |
| attn_out / mlp_out | blocks.L.hook_attn_out / hook_mlp_out | [batch, pos, d_model] |
| mlp_value | blocks.L.mlp.hook_out: v = k W_out (+ b), before a post-MLP norm (Gemma 2/3; else = mlp_out) | [batch, pos, d_model] |
| head | blocks.L.attn.hook_z | [batch, pos, head, d_head] |
| neuron | blocks.L.mlp.hook_post | [batch, pos, d_mlp] |
| pattern | blocks.L.attn.hook_pattern | [batch, head, query, key] |
| embed | hook_embed (no layer) | [batch, pos, d_model] |

`trace` is baukit's `Trace(stop=True)` for the bridge: keep some activations, optionally stop the
forward at a hook so nothing after it is computed.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Literal, get_args

import torch
from torch import Tensor

from .errors import LensBiasError

Site = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_value", "head", "neuron", "pattern",
               "embed"]

#: site → (hook name template, kind): kind "pos" [batch, pos, d], "head" [batch, pos, head, d_head],
#: "neuron" [batch, pos, d_mlp], "pattern" [batch, head, query, key].
SITES: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "pos"),
    "resid_mid": ("blocks.{}.hook_resid_mid", "pos"),
    "resid_post": ("blocks.{}.hook_resid_post", "pos"),
    "attn_out": ("blocks.{}.hook_attn_out", "pos"),
    "mlp_out": ("blocks.{}.hook_mlp_out", "pos"),
    "mlp_value": ("blocks.{}.mlp.hook_out", "pos"),
    "head": ("blocks.{}.attn.hook_z", "head"),
    "neuron": ("blocks.{}.mlp.hook_post", "neuron"),
    "pattern": ("blocks.{}.attn.hook_pattern", "pattern"),
    "embed": ("hook_embed", "pos"),
}
assert set(SITES) == set(get_args(Site))

#: the sites whose activations live in the residual stream's coordinates
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def hook_name(site: Site, layer: int | None = None) -> str:
    """The hook that carries `site` at `layer` (e.g. hook_name('head', 3) = 'blocks.3.attn.hook_z')."""
    if site not in SITES:
        raise LensBiasError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    template = SITES[site][0]
    if "{}" not in template:
        return template
    if layer is None:
        raise LensBiasError(f"site {site!r} needs a layer")
    return template.format(int(layer))


def site_kind(site: Site) -> str:
    """'pos', 'head', 'neuron' or 'pattern' (the layout of the site's activation)."""
    if site not in SITES:
        raise LensBiasError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    return SITES[site][1]


def check_sites(sites: Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
    """The sites as a list; a LensBiasError naming any that `what` does not take."""
    sites, allowed = list(sites), list(allowed)
    bad = [s for s in sites if s not in allowed]
    if bad or not sites:
        raise LensBiasError(f"unknown {what} site(s) {bad or sites}; choose from {', '.join(allowed)}")
    return sites


def last_resid(model) -> str:
    """The hook of the final residual stream (the last block's resid_post)."""
    return hook_name("resid_post", model.cfg.n_layers - 1)


def device_of(model) -> torch.device:
    """The device inputs go to: that of the model's first parameter which holds data (under a device_map
    with disk offload, offloaded parameters sit on the meta device; Accelerate moves inputs on between
    modules)."""
    first = None
    for p in model.parameters():
        if not p.is_meta:
            return p.device
        first = first or p.device
    return first if first is not None else torch.device("cpu")


def check_hook_names(model, names: Iterable[str]) -> None:
    """A LensBiasError naming every hook that the model does not have."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        return
    missing = [n for n in names if n not in hook_dict]
    if missing and all(n.endswith(".hook_resid_mid") for n in missing):
        raise LensBiasError("this model has no resid_mid: its attention and MLP read the same residual stream in "
                            "parallel (GPT-NeoX/Pythia style); patch resid_pre, resid_post, attn_out or mlp_out instead")
    if missing:
        some = ", ".join(sorted(k for k in hook_dict if k.startswith("blocks.0."))[:12])
        raise LensBiasError(f"hook name(s) {missing} do not exist in this model (layer-0 hooks include: {some}, ...)")


class Stop(Exception):
    """Raised inside a hook to end a forward early (caught by `trace`)."""


@contextlib.contextmanager
def trace(model, keep: Iterable[str] = (), *, stop_at: str | None = None, fwd_hooks: Iterable = (),
          detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Within the block, forwards of `model` record the activations at `keep` (and `stop_at`) into
    the yielded dict; with `stop_at` the forward ends right after that hook (nothing later is
    computed). `fwd_hooks` run first (e.g. patches). With `detach`, stored values are detached
    clones (a cache); otherwise they are the live tensors (gradients flow through them).

        with trace(model, stop_at=last_resid(model)) as acts:
            model(tokens)
        final = acts[last_resid(model)]
    """
    store: dict[str, Tensor] = {}
    names = set(keep) | ({stop_at} if stop_at else set())

    def saver(name):
        def save(x, hook):
            store[name] = x.detach().clone() if detach else x
            if name == stop_at:
                raise Stop
            return x
        return save

    with model.hooks(fwd_hooks=list(fwd_hooks) + [(n, saver(n)) for n in sorted(names)]):
        try:
            yield store
        except Stop:
            pass


def run_until(model, tokens: Tensor, stop_at: str | None = None, *, attention_mask: Tensor | None = None,
              fwd_hooks: Iterable = (), keep: Iterable[str] = (), detach: bool = False) -> dict[str, Tensor]:
    """One forward that stops after `stop_at` (default: the final residual stream), returning the
    activations at `stop_at` and `keep`."""
    stop_at = stop_at or last_resid(model)
    with trace(model, keep, stop_at=stop_at, fwd_hooks=fwd_hooks, detach=detach) as acts:
        model(tokens, attention_mask=attention_mask)
    if stop_at not in acts:
        raise LensBiasError(f"the forward never reached hook {stop_at!r}")
    return acts
