"""``python -m sandbox.cli``: the same as the ``sandbox`` command."""
import sys

from .run import main

sys.exit(main())
