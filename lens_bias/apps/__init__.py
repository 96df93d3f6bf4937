"""Apps: thin layers over the same functions the notebooks call — the `lens-bias` CLI, the demo, and
the one-call mitigation pipeline (apply, evaluate before/after, save the edit, export), and the locate
report (every method on one task, agreement, proof by ablation)."""

from .demo import run_demo
from .pipeline import export_edit, mitigate, parse_units
from .report import LocateReport, locate_report

__all__ = ["LocateReport", "export_edit", "locate_report", "mitigate", "parse_units", "run_demo"]
