"""hpcds's own cache folder: what commands keep between runs (DeepSpeed's verdicts on configs, compiled templates).

Light on purpose: the commands that render import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    """$HPCDS_CACHE_DIR, else $XDG_CACHE_HOME/hpcds (~/.cache/hpcds); None where no home folder is to be found
    (HOME unset, a uid without a passwd entry): then nothing is cached, and nothing fails."""
    if os.environ.get("HPCDS_CACHE_DIR"):
        return Path(os.environ["HPCDS_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "hpcds"
    try:
        return Path.home() / ".cache" / "hpcds"
    except RuntimeError:
        return None
