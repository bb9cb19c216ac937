"""Where the project's shared real data lives: ``../shared/data`` beside the checkout (the
documented place), else ``$ESMJAX_SHARED_DATA``, else the first ``shared/data`` above the
checkout, else ``/work/shared/data``."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def find_shared_data() -> Path:
    candidates = [ROOT.parent / "shared" / "data"]
    if os.environ.get("ESMJAX_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["ESMJAX_SHARED_DATA"]))
    candidates += [p / "shared" / "data" for p in ROOT.parents[1:]]
    candidates.append(Path("/work/shared/data"))
    for c in candidates:
        if (c / "SOURCES.md").exists():
            return c
    return candidates[0]


SHARED = find_shared_data()
