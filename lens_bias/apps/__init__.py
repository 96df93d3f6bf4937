"""Apps: thin layers over the same functions the notebooks call — the `lens-bias` CLI, the demo, and
the one-call mitigation pipeline (apply, evaluate before/after, save the edit, export)."""

from .demo import run_demo
from .pipeline import export_edit, mitigate, parse_units

__all__ = ["export_edit", "mitigate", "parse_units", "run_demo"]
