"""``python -m sandbox.cli``: the same as the ``sandbox`` command."""
import sys

from . import main

sys.exit(main())
