"""Exhaustive ablation on a Hugging Face Llama-style causal LM, with the model's own modules and plain
PyTorch hooks — no lens_bias code — so that its numbers can check lens_bias.

The forward is the HF model's own (`LlamaDecoderLayer`'s submodules: input_layernorm → self_attn →
post_attention_layernorm → mlp, the model's rotary embedding and final norm, the tied unembedding),
run layer by layer so that an intervention can start where it acts:

- from the cached residual at the first intervened layer (earlier layers cannot change);
- from the first intervened position, with the clean run's keys and values for the positions before
  it (causal attention: earlier positions cannot change);
- a prefix shared by every row (the chat template's system prompt and the instruction) is run once
  per intervention, not once per row, when the intervention is the same in every row (zero, mean);
- only the metric's positions are unembedded.

Units and their hook points (HF module names):

    head h of layer l   its z = the slice [h·d_head, (h+1)·d_head) of the input of self_attn.o_proj
    neuron i of layer l act(gate)·up = column i of the input of mlp.down_proj
    attn_out (l, p)     the output of self_attn at position p
    mlp_out (l, p)      the output of mlp at position p
    mlp (l), attn (l)   that output at every position

An intervention sets a unit's value: zero, the mean over the case's real tokens (position-independent),
or a donor row's value at the same position (resample: another prompt of the case; patching: the twin).
`effect = metric(model) − metric(model with the intervention)`: positive = the unit supports the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

SITES = ("head", "neuron", "attn_out", "mlp_out", "attn", "mlp")


class PrefixKV:
    """What LlamaAttention calls as `past_key_values`: `update(k, v, layer)` returns the keys and values of
    the positions before the run (`prefix[layer]`, expanded over the rows) followed by the new ones, and
    records the new ones in `record` when given."""

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]] | None = None, record: dict | None = None):
        self.prefix, self.record = prefix or {}, record

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs):
        if self.record is not None:
            self.record[layer_idx] = (key, value)
        if layer_idx in self.prefix:
            pk, pv = self.prefix[layer_idx]
            n = key.shape[0]
            key = torch.cat([pk.expand(n, -1, -1, -1), key], 2) if pk.shape[0] != n else torch.cat([pk, key], 2)
            value = torch.cat([pv.expand(n, -1, -1, -1), value], 2) if pv.shape[0] != n else torch.cat([pv, value], 2)
        return key, value


@dataclass
class Seqs:
    """The rows of a case: token ids [N, T] (right-padded), position ids [N, T], `allow[i, q, k]` (query q
    may attend key k: causal, or a tree for multiple-choice rows), `real` [N, T] (tokens of the prompt
    that count for mean ablation), the readout positions `read_pos` [N, P] (−1 = none) whose final hidden
    states `values(h [N, P, d], rows)` turns into per-row values [N, V], and `metrics(values [N, V])` →
    {name: scalar}. `shared`: the number of leading positions identical in every row."""

    ids: Tensor
    pos: Tensor
    allow: Tensor
    real: Tensor
    read_pos: Tensor
    values: Callable[[Tensor, Tensor], Tensor]
    metrics: Callable[[Tensor], dict[str, Tensor]]
    shared: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def T(self) -> int:
        return self.ids.shape[1]


def causal_rows(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids, pos, allow, real) of right-padded causal rows; padding attends only to itself."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        real[i, :len(s)] = True
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allow = causal[None] & real[:, None, :] | torch.eye(T, dtype=torch.bool)[None]
    pos = torch.arange(T)[None].expand(len(seqs), T).clone()
    return ids, pos, allow, real


def shared_prefix(ids: Tensor, real: Tensor) -> int:
    """How many leading positions hold the same real token in every row."""
    same = (ids == ids[:1]).all(0) & real.all(0)
    return int(same.int().cumprod(0).sum())


# ---------------------------------------------------------------------------------------------------
class Engine:
    """A causal LM (transformers, float32, eval) and one case's rows: the clean run cached once, then any
    number of interventions, batched (`rows_per_batch` rows of the full width at most)."""

    def __init__(self, hf_model, seqs: Seqs, *, rows_per_batch: int = 64, cache_neurons: bool = True):
        self.m, self.s = hf_model.eval(), seqs
        self.layers = hf_model.model.layers
        self.L = len(self.layers)
        cfg = hf_model.config
        self.H, self.dh = cfg.num_attention_heads, getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.W_U = hf_model.lm_head.weight
        self.rows_per_batch = rows_per_batch
        self.runs = 0  # interventions evaluated (for the card)
        self._clean(cache_neurons)

    # ---- the clean run ---------------------------------------------------------------------------
    @torch.no_grad()
    def _clean(self, cache_neurons: bool) -> None:
        s = self.s
        z, act, attn, mlp = {}, {}, {}, {}
        hooks = []
        for l, layer in enumerate(self.layers):
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, a, l=l: z.__setitem__(l, a[0].detach().clone())))
            if cache_neurons:
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                    lambda mod, a, l=l: act.__setitem__(l, a[0].detach().clone())))
            hooks.append(layer.self_attn.register_forward_hook(
                lambda mod, a, o, l=l: attn.__setitem__(l, o[0].detach().clone())))
            hooks.append(layer.mlp.register_forward_hook(
                lambda mod, a, o, l=l: mlp.__setitem__(l, o.detach().clone())))
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        resid: list[Tensor] = []
        try:
            x = self.m.model.embed_tokens(s.ids)
            final = self._layers(x, 0, 0, torch.arange(s.n), PrefixKV(record=kv), resid=resid)
        finally:
            for h in hooks:
                h.remove()
        self.resid = resid  # resid[l] = input of layer l, resid[L] = output of the last layer
        self.kv, self.z, self.act, self.attn_out, self.mlp_out = kv, z, act, attn, mlp
        self.base_values = s.values(self._read(final, 0, torch.arange(s.n)), torch.arange(s.n))
        self.base = {k: float(v) for k, v in s.metrics(self.base_values).items()}
        w = s.real.float()[..., None]
        cnt = w.sum((0, 1))
        self.means = {"z": {l: (v * w).sum((0, 1)) / cnt for l, v in z.items()},
                      "act": {l: (v * w).sum((0, 1)) / cnt for l, v in act.items()},
                      "attn_out": {l: (v * w).sum((0, 1)) / cnt for l, v in attn.items()},
                      "mlp_out": {l: (v * w).sum((0, 1)) / cnt for l, v in mlp.items()}}

    def _layers(self, x: Tensor, start: int, s: int, rows: Tensor, kv: PrefixKV, resid: list | None = None,
                stop: int | None = None) -> Tensor:
        """Layers start.. on x (rows `rows` of the case, positions s..s+x.shape[1]) with the keys and values
        of earlier positions from `kv`; returns the last layer's output (before the final norm)."""
        e = s + x.shape[1]
        pos = self.s.pos[rows, s:e]
        mask = self.s.allow[rows][:, None, s:e, :e]
        cos_sin = self.m.model.rotary_emb(x, pos)
        for l in range(start, self.L if stop is None else stop):
            if resid is not None:
                resid.append(x)
            layer = self.layers[l]
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=cos_sin,
                                   attention_mask=mask, past_key_values=kv)
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if resid is not None:
            resid.append(x)
        return x

    def _read(self, final: Tensor, s: int, rows: Tensor) -> Tensor:
        """Final-normed hidden states at the rows' readout positions [n, P, d] (positions ≥ s)."""
        rp = self.s.read_pos[rows]
        idx = (rp - s).clamp(min=0)
        h = final.gather(1, idx[..., None].expand(-1, -1, final.shape[-1]))
        return self.m.model.norm(h)

    # ---- interventions ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, groups: list[Group]) -> list[dict[str, float]]:
        """Effects of each group of interventions: effect = base − metric, per metric name."""
        out = []
        width = max(1, self.rows_per_batch)
        batch: list[Group] = []

        def flush():
            if batch:
                out.extend(self._run_batch(batch))
                batch.clear()

        for g in groups:
            if batch and (sum(len(b.rows) for b in batch) + len(g.rows) > width or
                          (batch[0].start, batch[0].s, batch[0].prefix_once) != (g.start, g.s, g.prefix_once)):
                flush()
            batch.append(g)
        flush()
        return out

    def _run_batch(self, groups: list[Group]) -> list[dict[str, float]]:
        start, s = groups[0].start, groups[0].s
        rows = torch.cat([g.rows for g in groups])
        offsets = torch.tensor([0] + [len(g.rows) for g in groups]).cumsum(0)
        handles = []
        try:
            kv_prefix = self._prefix_kv(groups, start, s, rows, offsets)
            for gi, g in enumerate(groups):
                for spec in g.specs:
                    handles.append(self._hook(spec, int(offsets[gi]), int(offsets[gi + 1]), g.rows, s))
            x = self.resid[start][rows, s:]
            final = self._layers(x, start, s, rows, PrefixKV(kv_prefix))
        finally:
            for h in handles:
                h.remove()
        vals = self.s.values(self._read(final, s, rows), rows)
        self.runs += len(groups)
        res = []
        for gi, g in enumerate(groups):
            v = self.base_values.clone()
            v[g.rows] = vals[offsets[gi]:offsets[gi + 1]]
            res.append({k: self.base[k] - float(m) for k, m in self.s.metrics(v).items()})
        return res

    def _prefix_kv(self, groups, start: int, s: int, rows: Tensor, offsets: Tensor) -> dict:
        """Keys and values of positions < s at layers ≥ start: the clean run's, or — for interventions that
        are the same in every row (`prefix_once`) — one run of the shared prefix per group."""
        if s == 0:
            return {}
        if not groups[0].prefix_once:
            return {l: (self.kv[l][0][rows, :, :s], self.kv[l][1][rows, :, :s]) for l in range(start, self.L)}
        one = torch.zeros(len(groups), dtype=torch.long)  # row 0 stands for every row on the shared prefix
        rec: dict = {}
        handles = [self._hook(spec, gi, gi + 1, one[:1], 0) for gi, g in enumerate(groups) for spec in g.specs]
        try:
            self._layers(self.resid[start][one, :s], start, 0, one, PrefixKV(record=rec))
        finally:
            for h in handles:
                h.remove()
        sizes = (offsets[1:] - offsets[:-1]).tolist()
        return {l: (k.repeat_interleave(torch.tensor(sizes), 0), v.repeat_interleave(torch.tensor(sizes), 0))
                for l, (k, v) in rec.items()}

    def _hook(self, spec: Spec, r0: int, r1: int, grows: Tensor, s: int):
        """A hook setting `spec`'s unit to its value in batch rows r0:r1 (the group's rows `grows`),
        positions s.. of the run."""
        layer = self.layers[spec.layer]
        value = spec.value

        def new_value(cur: Tensor) -> Tensor:  # cur [r1 - r0, q, width]
            if value.ndim <= 1:
                return value.expand_as(cur)
            return value[grows, s:s + cur.shape[1]]  # a donor tensor [N, T, width] of the case's rows

        if spec.site in ("head", "neuron"):
            assert spec.index is not None  # head and neuron units have an index (Spec)
            lo, hi = ((spec.index * self.dh, (spec.index + 1) * self.dh) if spec.site == "head"
                      else (spec.index, spec.index + 1))

            def pre(mod, args):
                x = args[0]
                x[r0:r1, :, lo:hi] = new_value(x[r0:r1, :, lo:hi])
                return (x,) + tuple(args[1:])

            mod = layer.self_attn.o_proj if spec.site == "head" else layer.mlp.down_proj
            return mod.register_forward_pre_hook(pre)

        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            if spec.position is None:
                x[r0:r1] = new_value(x[r0:r1])
            elif spec.position >= s:
                p = spec.position - s
                x[r0:r1, p:p + 1] = new_value(x[r0:r1, p:p + 1]) if value.ndim <= 1 else \
                    value[grows, spec.position:spec.position + 1]
            return out

        mod = layer.self_attn if spec.site in ("attn_out", "attn") else layer.mlp
        return mod.register_forward_hook(post)

    # ---- building interventions --------------------------------------------------------------------
    def value(self, site: str, layer: int, index: int | None, method: str, donor: Tensor | None = None) -> Tensor:
        """The value a unit is set to: zero, its mean over the case's real tokens, or its activation in a
        donor row (`donor[i]` = the row whose activation row i gets) at the same position."""
        full = {"head": self.z, "neuron": self.act}.get(site)
        if site in ("attn_out", "attn"):
            full = self.attn_out
        elif site in ("mlp_out", "mlp"):
            full = self.mlp_out
        if full is None:
            raise ValueError(f"unknown site {site!r}")
        act = full[layer]
        if site == "head":
            assert index is not None  # head and neuron units have an index (Spec)
            act = act[..., index * self.dh:(index + 1) * self.dh]
        elif site == "neuron":
            assert index is not None
            act = act[..., index:index + 1]
        if method == "zero":
            return torch.zeros(act.shape[-1])
        if method == "mean":
            key = {"head": "z", "neuron": "act"}.get(site, "attn_out" if "attn" in site else "mlp_out")
            mean = self.means[key][layer]
            if site == "head":
                return mean[index * self.dh:(index + 1) * self.dh]  # pyright: ignore[reportOptionalOperand] - head and neuron units have an index
            return mean[index:index + 1] if site == "neuron" else mean  # pyright: ignore[reportOptionalOperand] - head and neuron units have an index
        if donor is None:
            raise ValueError(f"{method} needs donor rows")
        return act[donor]


@dataclass
class Spec:
    """One unit set to a value: site, layer, index (head or neuron; None for whole outputs), position
    (None = every position), value ([width] for every row and position, or [N, T, width] per row)."""

    site: str
    layer: int
    index: int | None
    value: Tensor
    position: int | None = None


@dataclass
class Group:
    """Interventions applied together to `rows` of the case, from layer `start` and position `s` on;
    `prefix_once`: every row shares the intervention on positions < s (run the shared prefix once)."""

    specs: list[Spec]
    rows: Tensor
    start: int
    s: int = 0
    prefix_once: bool = False
