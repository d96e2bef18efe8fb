"""``python -m starflow ...``: the ``starflow`` command (as ``python -m starflow.cli``)."""
import sys

from starflow.cli import main

sys.exit(main())
