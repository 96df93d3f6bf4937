"""Build the localisation benchmark's models, case data and ground truth:

    python -m lens_bias.bench.build build --out data/bench [--steps N] [--threads 1] [--models gender,decision]

The build, cut by stage, is lens_bias/bench/recipe/ (its docstring describes it); this module is
its command line.
"""

from .recipe.steps import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
