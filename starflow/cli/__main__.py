"""``python -m starflow.cli ...`` (what ``torchrun -m starflow.cli`` runs)."""
import sys

from starflow.cli import main

sys.exit(main())
