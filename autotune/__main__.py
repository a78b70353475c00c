"""``python -m hyper_backend.autotune``: see `hyper_backend.autotune.cli`."""

import sys

from .cli import main

sys.exit(main())
