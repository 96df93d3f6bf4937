"""The result shape of every locate method: `ComponentScores` — a tensor of scores with named
dims, `to_frame()` (tidy pandas), `top(k)`, `argmax()` and `units(n)`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import LensBiasError


@dataclass
class ComponentScores:
    """Scores of model components (patching effects, attributions, traced effects).

    `values` has one axis per name in `dims` (e.g. ("layer", "pos") or ("layer", "head")).
    For activation patching and tracing `values` is the mean metric after patching and
    `clean`/`corrupted` the unpatched means, so `normalized` = (value − corrupted)/(clean − corrupted);
    for attribution `values` is the estimated effect itself. `tokens` labels the positions.
    """

    values: Tensor
    dims: tuple[str, ...]
    component: str
    method: str
    clean: float = float("nan")
    corrupted: float = float("nan")
    tokens: list[str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def effect(self) -> Tensor:
        """value − corrupted (activation patching, tracing) or the score itself (attribution)."""
        if self.method in ("activation", "tracing"):
            return self.values - self.corrupted
        return self.values

    @property
    def normalized(self) -> Tensor:
        """effect/(clean − corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
        gap = self.clean - self.corrupted
        if not gap or gap != gap:
            raise LensBiasError("clean and corrupted metrics are equal or unknown: nothing to normalise by")
        return self.effect / gap

    def to_frame(self):
        """Tidy table: one row per component (component, method, layer, head/neuron, pos, token, value,
        effect, normalized)."""
        import pandas as pd

        shape = tuple(self.values.shape)
        idx = torch.cartesian_prod(*[torch.arange(n) for n in shape]) if len(shape) > 1 \
            else torch.arange(shape[0])[:, None]  # pyright: ignore[reportGeneralTypeIssues] - a 1-d shape here
        cols = {d: idx[:, i].tolist() for i, d in enumerate(self.dims)}
        layers = self.extra.get("layers")
        if layers is not None and "layer" in cols:
            cols["layer"] = [layers[i] for i in cols["layer"]]
        df = pd.DataFrame({"component": self.component, "method": self.method, **cols})
        if "pos" in cols and self.tokens is not None:
            df["token"] = [self.tokens[p] if p < len(self.tokens) else "" for p in cols["pos"]]
        df["value"] = self.values.reshape(-1).tolist()
        df["effect"] = self.effect.reshape(-1).tolist()
        gap = self.clean - self.corrupted
        if gap and gap == gap:
            df["normalized"] = df["effect"] / gap
        return df

    def top(self, k: int = 10):
        """The k components with the largest |effect|."""
        df = self.to_frame()
        return df.reindex(df["effect"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def argmax(self) -> tuple[int, ...]:
        """Coordinates (indices into `values`) of the component with the largest signed effect."""
        flat = int(self.effect.reshape(-1).argmax())
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.values.shape))

    def units(self, n: int, *, largest: bool = True) -> list[tuple[int, ...]]:
        """The n components with the highest (or, `largest=False`, lowest) signed effect, as index
        tuples into `values` — e.g. (layer, neuron) or (layer, head), layers as model layers."""
        eff = self.effect.reshape(-1)
        if not 0 < n <= eff.numel():
            raise LensBiasError(f"n = {n} units asked for, but the scores cover {eff.numel()}")
        flat = eff.topk(n, largest=largest).indices
        layers = self.extra.get("layers")
        out = []
        for i in flat.tolist():
            idx = [int(v) for v in torch.unravel_index(torch.tensor(i), self.values.shape)]
            if layers is not None and self.dims[0] == "layer":
                idx[0] = int(layers[idx[0]])
            out.append(tuple(idx))
        return out

