"""``python -m gem_jax.cli``: the ``gem-jax`` command."""

import sys

from gem_jax.cli import main

sys.exit(main())
