"""`python -m llmlab ...` and `torchrun --nproc_per_node N -m llmlab train ...`."""

import sys

from llmlab.cli import main

sys.exit(main())
