"""Make docs/locate_report.png, the README's picture of the locate report: the organism's professions report,
necessity curves (zero ablation) of every method against k random units, one panel per unit type.

    PYTHONPATH=. python docs/make_locate_report_png.py [OUT.png]

Needs kaleido 0.2.1 (a dev tool, not a lens_bias dependency: `pip install kaleido==0.2.1`) to render the
plotly figure the report's page shows; the options are the CLI's defaults."""

import json
import sys
import warnings
from pathlib import Path

import plotly

import lens_bias as lb


def to_png(fig) -> bytes:
    """PNG bytes through kaleido 0.2.1's own scope (plotly ≥ 6's write_image asks for kaleido ≥ 1 and a Chrome)."""
    from kaleido.scopes.plotly import PlotlyScope

    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"  # the plotly.js that reads plotly 6 JSON
    return PlotlyScope(plotlyjs=str(js)).transform(json.loads(fig.to_json()), format="png", width=fig.layout.width, height=fig.layout.height,
                                   scale=1)


def main(out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lb.locate_report(lb.load_model("organism"), "professions", progress=False)
    fig = report.main_figure("zero")
    fig.update_layout(title={"text": "Locate report, professions on the organism: share of the bias removed by "
                                     "zero-ablating each method's top-k<br>vs k random units (grey: mean ± std); "
                                     "the planted neuron L0N103 is the neuron methods' top-1", "font": {"size": 13}},
                      width=1100, height=440, margin={"t": 80, "b": 40, "l": 60, "r": 20},
                      legend={"orientation": "h", "y": -0.22})
    fig.update_yaxes(title_text="share of the bias removed", col=1)
    out.write_bytes(to_png(fig))
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")
    print(report)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "locate_report.png")
