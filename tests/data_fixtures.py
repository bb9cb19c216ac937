"""Datasets built once per test session from the real data in ../shared/data (shared by
tests/test_data_*.py)."""

from __future__ import annotations

from pathlib import Path

from esmjax.data.build import build_dataset

ROOT = Path(__file__).resolve().parents[1]
from shared_paths import SHARED  # noqa: E402

CATH_FASTA = SHARED / "cath_s20" / "cath-dataset-nonredundant-S20-v4_3_0.fa"
SCOPE_FASTA = SHARED / "scope_astral40" / "astral.fa"
SCOPE_LABELS = SHARED / "scope_astral40" / "derived_astral40_labels.tsv"

_BUILT: dict[str, Path] = {}


def cath_head(out: Path, n: int) -> Path:
    """The first ``n`` records of the shared CATH S20 FASTA, written to ``out``."""
    from esmjax.io.fasta import read_fasta

    with open(out, "w") as f:
        for i, r in enumerate(read_fasta(CATH_FASTA)):
            if i == n:
                break
            f.write(f">{r.id}\n{r.sequence}\n")
    return out


def scope_family_tsv(out: Path) -> Path:
    """SCOPe family -> domain membership (4,583 families, 1 to 156 members): very skewed
    clusters."""
    rows = []
    for line in SCOPE_LABELS.read_text().splitlines()[1:]:
        sid, _, _, _, _, family = line.split("\t")[:6]
        rows.append(f"{family}\t{sid}\n")
    out.write_text("".join(rows))
    return out


def built(tmp_path_factory, name: str) -> Path:
    """``cath``: CATH S20, 2% held out, each record its own cluster. ``scope``: SCOPe ASTRAL 40
    clustered by family, 5% of families held out."""
    if name not in _BUILT:
        base = tmp_path_factory.mktemp(f"data_{name}")
        if name == "cath":
            build_dataset([CATH_FASTA], base / "ds", val_fraction=0.02)
        else:
            tsv = scope_family_tsv(base / "families.tsv")
            build_dataset([SCOPE_FASTA], base / "ds", clusters=tsv, val_fraction=0.05)
        _BUILT[name] = base / "ds"
    return _BUILT[name]
