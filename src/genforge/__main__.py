"""`python -m genforge ...`, as torchrun starts each process: `torchrun --nproc-per-node N -m genforge train ...`."""

import sys

from genforge.cli import main

sys.exit(main())
