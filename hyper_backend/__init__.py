"""hyper-backend: a ``torch.compile`` backend that runs attention as HyperAttention.

``torch.compile(model, backend="hyper")`` works without importing this package (entry point
``torch_dynamo_backends``). Direct use: `hyper_attention`, a drop-in for
``F.scaled_dot_product_attention``; `window_attention`, exact sliding-window (banded) attention at
O(n w); `HyperConfig` holds the parameters; `explain` reports what the
backend would do to a model; `check_env` validates the ``HYPER_*`` environment (also
``python -m hyper_backend.check``).
"""

from hyper_backend._checkout import unshadow

unshadow()  # before anything imports transformers: see `hyper_backend._checkout`

from hyper_backend.attention import hyper_attention, window_attention  # noqa: E402
from hyper_backend.config import HyperConfig  # noqa: E402

__version__ = "0.1.0"


def explain(model, *args, **kwargs):
    """Compile ``model`` with the hyper backend on these inputs and return the report of its attention sites."""
    from hyper_backend.report import explain as _explain

    return _explain(model, *args, **kwargs)


def check_env():
    """Validate every ``HYPER_*`` variable and return the resolved settings (`hyper_backend.check.EnvReport`);
    a bad or unknown variable raises ``EnvError`` naming it, its value and the accepted forms."""
    from hyper_backend.check import check_env as _check_env  # lazily: ``python -m hyper_backend.check``

    return _check_env()


__all__ = ["HyperConfig", "hyper_attention", "window_attention", "explain", "check_env", "__version__"]
