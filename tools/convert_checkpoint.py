#!/usr/bin/env python
"""Checkpoint conversion (same as the `nsa-convert` console script); see --help."""
import sys

from nsa_dist.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
