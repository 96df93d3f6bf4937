"""Truth cells recomputed the slow way: full forwards of the Hugging Face model (`model(input_ids)`) with plain
PyTorch hooks and none of engine.py's shortcuts — no cached residuals, no prefix reuse, no tree packing
(each BBQ option is its own sequence), the unit set at every position of every row (or at its one position),
the means and donor values taken from this module's own clean forward. Used by the build's self-check and
by the tests (tests/bench/test_real.py)."""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from torch import Tensor

#: truth tensor name → (unit kind, site for the hook)
KINDS = {"heads": "head", "neurons": "neuron", "sample_neurons": "neuron", "pos_attn": "attn_out",
         "pos_mlp": "mlp_out", "attn_layer": "attn", "mlp_layer": "mlp"}


def sequences(seqs) -> list[tuple[int, int | None, list[int]]]:
    """(row, option or None, token ids) of every sequence the case's metric reads, untied."""
    if "parts" in seqs.meta:
        return [(i, k, p + o) for i, (p, opts) in enumerate(seqs.meta["parts"]) for k, o in enumerate(opts)]
    lengths = seqs.real.sum(1).tolist()
    return [(i, None, seqs.ids[i, :n].tolist()) for i, n in enumerate(lengths)]


def _module(hf, site: str, layer: int):
    blk = hf.model.layers[layer]
    return {"head": blk.self_attn.o_proj, "neuron": blk.mlp.down_proj, "attn_out": blk.self_attn,
            "attn": blk.self_attn, "mlp_out": blk.mlp, "mlp": blk.mlp}[site]


def _slice(hf, site: str, index):
    d = hf.config.hidden_size // hf.config.num_attention_heads
    if site == "head":
        return slice(index * d, (index + 1) * d)
    if site == "neuron":
        return slice(index, index + 1)
    return slice(None)


@torch.no_grad()
def _run(hf, seqs, site: str, layer: int, setter=None) -> tuple[Tensor, dict]:
    """Per-row values [N, V] of full forwards (sequences of one length batched, no padding) and the unit's
    clean activation per sequence; `setter(seq_index, act [q, width]) -> new act` intervenes."""
    seq_list = sequences(seqs)
    by_len = defaultdict(list)
    for j, (_, _, ids) in enumerate(seq_list):
        by_len[len(ids)].append(j)
    mod = _module(hf, site, layer)
    acts: dict[int, Tensor] = {}
    out_vals: dict[int, Tensor] = {}
    for n, js in by_len.items():
        ids = torch.tensor([seq_list[j][2] for j in js])

        def edit(x: Tensor, js=js) -> Tensor:
            for r, j in enumerate(js):
                acts[j] = x[r].detach().clone()
                if setter is not None:
                    x[r] = setter(j, x[r])
            return x

        if site in ("head", "neuron"):
            h = mod.register_forward_pre_hook(lambda m, a: (edit(a[0].clone()),) + tuple(a[1:]))
        else:
            h = mod.register_forward_hook(lambda m, a, o: (edit(o[0].clone()),) + tuple(o[1:])
                                          if isinstance(o, tuple) else edit(o.clone()))
        try:
            logits = hf(input_ids=ids).logits.float()
        finally:
            h.remove()
        for r, j in enumerate(js):
            row, opt, toks = seq_list[j]
            if opt is None:
                a = seqs.meta["answers"][row]
                out_vals[j] = (logits[r, n - 1, a[0]] - logits[r, n - 1, a[1]]).view(1)
            else:
                p_len = len(seqs.meta["parts"][row][0])
                lp = logits[r, p_len - 1:n - 1].log_softmax(-1)
                out_vals[j] = lp.gather(1, torch.tensor(toks[p_len:])[:, None]).sum().view(1)
    values = torch.zeros(seqs.n, 3 if "parts" in seqs.meta else 1)
    for j, (row, opt, _) in enumerate(seq_list):
        values[row, 0 if opt is None else opt] = out_vals[j]
    return values, acts


def recompute_cell(hf, seqs, cell: dict, donor: Tensor | None) -> float:
    """effect = metric(model) − metric(model with the cell's intervention), from full hooked forwards."""
    site, layer, index, pos, method = cell["site"], cell["layer"], cell.get("index"), cell.get("position"), cell["method"]
    sl = _slice(hf, site, index)
    base_vals, acts = _run(hf, seqs, site, layer)
    seq_list = sequences(seqs)
    first = {}
    for j, (row, _opt, _) in enumerate(seq_list):
        first.setdefault(row, j)
    if method == "mean":  # over the rows' real tokens (BBQ: the prompt's), position-independent
        parts = []
        for row, j in first.items():
            n = int(seqs.real[row].sum())
            parts.append(acts[j][:n, sl])  # an untied sequence starts with its real tokens
        value = torch.cat(parts).mean(0)
    rows_hit = None
    if method == "patch":
        rows_hit, src = set(seqs.meta["clean"].tolist()), seqs.meta["twin"]
    elif method == "denoise":
        rows_hit, src = set(seqs.meta["corrupted"].tolist()), seqs.meta["twin"]
    elif method == "resample":
        if donor is None:
            raise ValueError("resample needs donor rows")
        src = donor

    from_answer = bool(seqs.meta.get("from_answer"))

    def setter(j: int, x: Tensor) -> Tensor:
        row = seq_list[j][0]
        if rows_hit is not None and row not in rows_hit:
            return x
        at = slice(None) if pos is None else slice(pos, pos + 1)
        if from_answer:  # from the prompt's last token on (it predicts the option's first token)
            at = slice(len(seqs.meta["parts"][row][0]) - 1, None)
        if method == "zero":
            x[at, sl] = 0.0
        elif method == "mean":
            x[at, sl] = value
        else:
            x[at, sl] = acts[first[int(src[row])]][at, sl]
        return x

    vals, _ = _run(hf, seqs, site, layer, setter)
    m = cell.get("metric", "bias")
    return float(seqs.metrics(base_vals)[m] - seqs.metrics(vals)[m])


def truth_cells(truth: dict[str, Tensor], name: str, *, seed: int = 0, n: int = 6, metric: str = "bias") -> list[dict]:
    """n cells of the case's single-unit truth tensors: half drawn uniformly, half among the largest |effects|
    (a shortcut that zeroes everything would pass on small cells alone)."""
    rng = random.Random(seed)
    pools = []
    for key, t in truth.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != name or parts[1] != metric:
            continue
        stem, _, method = parts[2].rpartition("_")
        if stem not in KINDS:
            continue
        pools.append((stem, method, t))
    cells = []
    for j in range(n):
        stem, method, t = pools[rng.randrange(len(pools))]
        flat = t.reshape(-1)
        i = rng.randrange(flat.numel()) if j % 2 == 0 else \
            int(flat.abs().argsort(descending=True)[rng.randrange(min(5, flat.numel()))])
        cells.append({**_address(truth, name, stem, t, i), "method": method, "metric": metric, "value": float(flat[i]),
                      "key": f"{name}/{metric}/{stem}_{method}", "flat": i})
    return cells


def _address(truth, name: str, stem: str, t: Tensor, i: int) -> dict:
    site = KINDS[stem]
    if stem == "heads":
        return {"site": site, "layer": i // t.shape[1], "index": i % t.shape[1]}
    if stem == "neurons":
        layers = truth[f"{name}/neuron_layers"].tolist()
        return {"site": site, "layer": layers[i // t.shape[1]], "index": i % t.shape[1]}
    if stem == "sample_neurons":
        l, k = truth[f"{name}/sample_index"][i].tolist()
        return {"site": site, "layer": l, "index": k}
    if stem in ("pos_attn", "pos_mlp"):
        return {"site": site, "layer": i // t.shape[1], "position": i % t.shape[1]}
    return {"site": site, "layer": i}
