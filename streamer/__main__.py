"""``python -m streamer ...``: the ``streamer`` command, for when ``.venv/bin`` is not on PATH."""

from __future__ import annotations

import sys

from streamer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
