"""`python -m lens_bias COMMAND` (also under torchrun / accelerate launch): the `lens-bias` command line."""

import sys

from .apps.cli import main

sys.exit(main())
