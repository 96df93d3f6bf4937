"""Batch runs of the locate methods over whole data sets: chunked, resumable, data-parallel.

registry.py lists the methods (one entry each), store.py keeps a run folder (manifest, chunks),
parallel.py joins torchrun / accelerate process groups, dataset.py runs a method over a data set.
"""

from .dataset import RunResult, attribute_dataset, result_frame, run_dataset, write_outputs
from .parallel import distributed
from .registry import REGISTRY, get_method, load_run_data
from .store import read_manifest

__all__ = ["REGISTRY", "RunResult", "attribute_dataset", "distributed", "get_method", "load_run_data",
           "read_manifest", "result_frame", "run_dataset", "write_outputs"]
