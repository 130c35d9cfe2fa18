"""Where the offline data folder is: one rule for every part of ``dao``."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variables naming the data folder, in order of precedence (the second is
#: an older name, still honoured).
DATA_ROOT_VARS = ("DAO_DATA_ROOT", "DAO_DATA_DIR")


def data_root() -> Path:
    """The data folder (the layout of ``../shared/data``, see its README).

    ``$DAO_DATA_ROOT`` (or ``$DAO_DATA_DIR``) if set; else ``../shared/data`` from the
    working directory if it exists (a checkout's root, as the configs assume); else
    ``shared/data`` beside a source checkout of this package; else ``../shared/data``,
    so that a missing folder is named in the error.
    """
    for var in DATA_ROOT_VARS:
        if os.environ.get(var):
            return Path(os.environ[var])
    candidates = [Path("../shared/data"), Path(__file__).resolve().parents[4] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])
