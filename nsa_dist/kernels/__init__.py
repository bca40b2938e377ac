"""``nsa_dist.kernels``: the Triton kernels, whose sources are the checkout's top-level ``kernels/``.

Installed from a wheel, ``kernels/`` is copied here (setup.py's ``package_dir``) and this file
is not installed. From a source checkout (on ``PYTHONPATH``, or installed editable) Python finds
this file: it adds ``kernels/`` to the package's path, so ``nsa_dist.kernels.api`` and the other
modules are that folder's. ``kernels/`` has no ``__init__.py``, so a checkout root on ``sys.path``
never shadows another package named ``kernels`` (Hugging Face's, which transformers imports).
"""
import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "kernels"))
