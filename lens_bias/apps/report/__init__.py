"""The locate report (#16): every locate method on one task, where they agree, and proof by ablation.

`locate_report(model, task, out)` runs every method that applies to the task, maps the scores onto common
units (units.py), measures agreement (agreement.py) and the faithfulness of each method's top-k by ablation
on held-out prompts (faithfulness.py), ranks the methods, and writes one HTML page, tidy tables and a JSON
summary (page.py, main.py). `ranking_vs_truth` compares the report's ranking with ground-truth effects.
"""

from .agreement import agreement_table, overlap, spearman
from .faithfulness import Faithfulness, rank_methods
from .main import LocateReport, locate_report
from .tasks import ReportTask, resolve_task
from .truth import ranking_vs_truth
from .units import ABLATABLE, LAYER_PARTS, SITE_PARTS, UNIT_TYPES

__all__ = [
           "ABLATABLE",
           "LAYER_PARTS",
           "SITE_PARTS",
           "UNIT_TYPES",
           "Faithfulness",
           "LocateReport",
           "ReportTask",
           "agreement_table",
           "locate_report",
           "overlap",
           "rank_methods",
           "ranking_vs_truth",
           "resolve_task",
           "spearman",
]
