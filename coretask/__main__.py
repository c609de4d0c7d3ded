"""``python -m coretask --app MODULE:ATTRIBUTE COMMAND``: the admin CLI (see coretask.cli)."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
