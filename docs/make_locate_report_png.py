"""Make docs/locate_report.png, the README's picture of the locate report: the first screen of the real model's
professions report (SmolLM2-135M-Instruct, dequantized Q4_1 weights) as headless Chromium shows it — the same
path the tests open pages with (lens_bias.core.browser), so the picture is what a reader's browser renders.

    PYTHONPATH=. python docs/make_locate_report_png.py [--report DIR] [--model M] [--out PNG] [--width 1400]
        [--height 800] [--full PNG]

--report: an existing report folder (report.html) to photograph, e.g. the one
`lens-bias locate --model smollm2-135m-instruct --task professions --out DIR` wrote; otherwise that report runs
on --model (default smollm2-135m-instruct) into a temporary folder. --full: also a PNG of the whole page
(--full-height px tall). Needs `chromium` (apt-get install -y chromium).
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import lens_bias as lb
from lens_bias.core.browser import check_page, screenshot

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=None, help="a report folder to photograph (default: run one)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the model to run the report on (without --report)")
    ap.add_argument("--out", type=Path, default=HERE / "locate_report.png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--full", type=Path, default=None, help="also a PNG of the whole page")
    ap.add_argument("--full-height", type=int, default=7000)
    args = ap.parse_args()
    folder = args.report
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="locate-report-")) / "professions"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(lb.locate_report(args.model, "professions", folder))
    page = folder / "report.html"
    check = check_page(page)
    if not check.ok:
        raise SystemExit(f"the page does not render: {check}")
    screenshot(page, args.out, args.width, args.height)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB ({check})")
    if args.full is not None:
        screenshot(page, args.full, args.width, args.full_height)
        print(f"{args.full}: {args.full.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
