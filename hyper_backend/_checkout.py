"""Running from a source checkout: its top-level ``kernels/`` directory (installed as ``hyper_backend.kernels``)
must not hide the ``kernels`` distribution from Hugging Face, which transformers imports at load time once it is
installed (transformers 5.25 requires it).

With the checkout's root on ``sys.path`` (``python -m ...`` run from it puts it first), ``import kernels`` would
find the sources here and transformers would fail with an ImportError. `unshadow` imports the installed
distribution once, with the checkout's root left out of the search, so every later ``import kernels`` gets it
from ``sys.modules``. Installed from a wheel, or with no ``kernels`` distribution, it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

_MARKER = "triton_topk.py"  # a file of this project's kernels package, not of any other


def unshadow() -> None:
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
        importlib.metadata.distribution("kernels")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return
    if spec is None or not spec.origin or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), _MARKER)):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
