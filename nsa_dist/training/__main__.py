"""``python -m nsa_dist.training``: the same as the ``nsa-pretrain`` console script."""
import sys

from .cli import main

sys.exit(main())
