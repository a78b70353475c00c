"""Running from a source checkout: its top-level ``kernels/`` directory (installed as ``hyper_backend.kernels``)
must not hide the ``kernels`` distribution from Hugging Face, which transformers imports at load time once it is
installed (transformers 5.25 requires it).

With the checkout's root on ``sys.path`` (``python -m ...`` run from it puts it first), ``import kernels`` would
find the sources here and transformers would fail with an ImportError. `unshadow` puts a finder first on
``sys.meta_path`` that looks the top-level name ``kernels`` up on ``sys.path`` without the checkout's root; nothing
is imported until something asks for ``kernels``. Installed from a wheel, or with no ``kernels`` distribution, it
does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys

_MARKER = "triton_topk.py"  # a file of this project's kernels package, not of any other


class _Distribution(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` on ``sys.path`` with the checkout's ``root`` left out."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name != "kernels" or path is not None:
            return None
        rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != self.root]
        return importlib.machinery.PathFinder.find_spec(name, rest)


def unshadow() -> None:
    if "kernels" in sys.modules or any(isinstance(f, _Distribution) for f in sys.meta_path):
        return
    try:
        spec = importlib.util.find_spec("kernels")
        importlib.metadata.distribution("kernels")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return
    if spec is None or not spec.origin or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), _MARKER)):
        return
    sys.meta_path.insert(0, _Distribution(os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))))
