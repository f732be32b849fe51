"""``python -m mamlkit``: the ``mamlkit`` command (what ``torchrun -m mamlkit`` runs on each rank)."""

import sys

from .cli import main

sys.exit(main())
