"""Shared test set-up: the tests folder is importable (naive oracle, input factories)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
