"""Shared test set-up: the tests folder is importable (naive oracle, input factories)."""
import importlib.machinery
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _installed_kernels_package_first():
    """transformers (5.x) imports Hugging Face's ``kernels`` package. This checkout's top-level
    kernels/ folder (installed as nsa_dist.kernels) shadows it whenever the checkout's root is
    on sys.path: ``python -m pytest`` from the root, or a tool that adds the root. Load the
    installed package under its name first, so that later imports find it in sys.modules."""
    if "kernels" in sys.modules:
        return
    root = os.path.dirname(HERE)
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return  # not installed: nothing to shadow
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:  # noqa: BLE001 - a broken install: leave the name to the normal import
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]


_installed_kernels_package_first()
