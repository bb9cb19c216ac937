"""``esmjax evaluate structures``: predicted structures (``esmjax fold`` output or any PDB/mmCIF)
scored against experimental ones, with biotite's implementations.

Per target (one chain of each file; ``FILE:CHAIN`` as in ``evaluate contacts``, default the first
protein chain; first model; highest-occupancy altloc; hydrogens dropped):

- Residue correspondence: identity when the two chains have the same sequence, else a global
  alignment (BLOSUM62, ``biotite.sequence.align.align_optimal``); ``coverage`` = aligned reference
  residues / reference residues. Atoms pair by name within aligned residues.
- lDDT (Mariani et al. 2013, ``biotite.structure.lddt``): 15 A inclusion radius, 0.5/1/2/4 A
  thresholds, contacts between different residues, over the paired atoms: all heavy atoms
  (``lddt``) and CA only (``lddt_ca``; per residue for the pLDDT check). Reference atoms with no
  partner in the prediction are left out rather than counted as lost.
- RMSD (CA) after the least-squares superposition (``biotite.structure.superimpose``).
- TM-score (Zhang & Skolnick 2004), normalised by the reference length and computed as TM-align /
  US-align do (pairs beyond their d8 cutoff left out; ``tm_score``), and GDT-TS (Zemla 2003: mean
  fraction of reference residues within 1, 2, 4 and 8 A), each the maximum over superpositions
  searched as TM-score does: the coordinates as given, the all-CA fit, and fits on seed fragments
  (L, L/2, L/4, ... >= 4 residues) refined on the residues within a distance cutoff. Both are
  lower bounds of the true maxima, as are TM-score's own.
- pLDDT calibration (Lin et al. 2023, Fig. 2): Pearson correlation of the prediction's per-residue
  pLDDT (its ``<id>.json`` from ``esmjax fold`` when present, else the CA B-factor) with per-residue
  CA lDDT.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.io.structures import (
    CIF_SUFFIXES,
    PDB_SUFFIXES,
    StructureError,
    file_format,
    one_letter,
    open_text,
    pick_chain,
    polymer_atoms,
    split_spec,
)

GDT_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
METRICS = ("lddt", "lddt_ca", "tm_score", "gdt_ts", "rmsd_ca", "plddt_lddt_pearson")


@dataclass(frozen=True)
class Chain:
    path: str
    chain: str
    atoms: object  # biotite AtomArray of one chain (heavy atoms, first model)
    sequence: str
    starts: np.ndarray  # [R+1] residue start indices into atoms

    @property
    def name(self) -> str:
        return f"{paths.given(self.path).name}:{self.chain}"


def load_chain(spec: str, model: int = 1) -> Chain:
    """One protein chain of a PDB/mmCIF file (``FILE`` or ``FILE:CHAIN``)."""
    import biotite.structure as struc

    path_s, chain = split_spec(spec)
    path = paths.given(path_s)  # a local path or a bucket URL
    with paths.remote_errors(path_s):
        if not path.is_file():
            raise StructureError(f"{path}: no such structure file")
    fmt = file_format(path)
    try:
        if fmt == "pdb":
            import biotite.structure.io.pdb as pdb

            f = pdb.PDBFile.read(open_text(path))
            atoms = f.get_structure(model=model, altloc="occupancy", extra_fields=["b_factor"])
        else:
            import biotite.structure.io.pdbx as pdbx

            f = pdbx.CIFFile.read(open_text(path))
            atoms = pdbx.get_structure(
                f,
                model=model,
                altloc="occupancy",
                extra_fields=["b_factor"],
                use_author_fields=True,
            )
    except InputError:
        raise
    except Exception as e:  # biotite raises several types for malformed files
        raise StructureError(f"{path}: cannot read the structure ({e})") from None
    atoms = polymer_atoms(atoms)
    chains = list(dict.fromkeys(str(c) for c in atoms.chain_id))
    chain = pick_chain(path, chains, chain)
    atoms = atoms[atoms.chain_id == chain]
    starts = struc.get_residue_starts(atoms, add_exclusive_stop=True)
    seq = "".join(one_letter(str(atoms.res_name[s])) for s in starts[:-1])
    return Chain(str(path), chain, atoms, seq, starts)


def align_residues(ref: str, pred: str) -> np.ndarray:
    """[K, 2] pairs (reference residue, predicted residue): identity, or a BLOSUM62 alignment."""
    if ref == pred:
        return np.stack([np.arange(len(ref))] * 2, axis=1)
    from biotite.sequence import ProteinSequence
    from biotite.sequence.align import SubstitutionMatrix, align_optimal

    def seq(s: str) -> ProteinSequence:
        return ProteinSequence(s.replace("U", "C").replace("O", "K"))

    matrix = SubstitutionMatrix.std_protein_matrix()
    ali = align_optimal(seq(ref), seq(pred), matrix, gap_penalty=(-10, -1), terminal_penalty=False)
    trace = ali[0].trace
    return trace[(trace[:, 0] >= 0) & (trace[:, 1] >= 0)]


def _paired_atoms(ref: Chain, pred: Chain, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atom indices (reference, prediction) of same-named atoms in aligned residues."""
    ri, pi = [], []
    for r, p in pairs:
        names = {
            str(n): k
            for k, n in enumerate(pred.atoms.atom_name[pred.starts[p] : pred.starts[p + 1]])
        }
        for k in range(ref.starts[r], ref.starts[r + 1]):
            j = names.get(str(ref.atoms.atom_name[k]))
            if j is not None:
                ri.append(k)
                pi.append(pred.starts[p] + j)
    return np.asarray(ri, int), np.asarray(pi, int)


def _superpose(fixed: np.ndarray, mobile: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """``mobile`` moved by the least-squares fit of ``mobile[fit]`` onto ``fixed[fit]``."""
    import biotite.structure as struc

    _, transform = struc.superimpose(fixed[fit], mobile[fit])
    return transform.apply(mobile)


def tm_d0(n_ref: int) -> float:
    """TM-score's distance scale d0 (Zhang & Skolnick 2004): 1.24 (L - 15)^(1/3) - 1.8 A, and
    0.5 A for L <= 21 (TM-align / US-align's rule for short chains)."""
    return max(1.24 * np.cbrt(n_ref - 15) - 1.8, 0.5) if n_ref > 21 else 0.5


def tm_score(d: np.ndarray, n_ref: int) -> float:
    """TM-score of paired-residue distances ``d`` [K] (A), as TM-align / US-align report it.

    ``sum_i 1 / (1 + (d_i / d0)^2) / L`` over the pairs within d8 = 1.5 L^0.3 + 3.5 A: the two
    programs leave farther pairs out of the final score (their ``score_d8`` cutoff), which
    ``biotite.structure.tm_score`` does not. With the cutoff, US-align's ``-se`` scores of the NMR
    models in ``shared/data/structures/biotite/tm_scores.json`` are reproduced to 5e-6; without it,
    1GYA model 4 (2 residues beyond d8) is 1.6e-3 too high.
    """
    d0, d8 = tm_d0(n_ref), 1.5 * n_ref**0.3 + 3.5
    d = np.asarray(d, np.float64)
    return float(np.sum(np.where(d <= d8, 1.0 / (1.0 + (d / d0) ** 2), 0.0)) / n_ref)


def search_superpositions(ref_atoms, pred_ca: np.ndarray, n_ref: int) -> dict:
    """TM-score and GDT-TS maximised over candidate superpositions (TM-score's seed-and-extend).

    ``ref_atoms``: the reference CA AtomArray [K]; ``pred_ca``: the paired predicted CAs [K, 3].
    """

    ref_ca = ref_atoms.coord
    k = len(ref_ca)
    d0 = tm_d0(n_ref)
    candidates = [pred_ca]
    if k >= 3:
        candidates.append(_superpose(ref_ca, pred_ca, np.arange(k)))
        length = k
        while length >= 4:
            step = max(1, length // 2)
            for start in range(0, k - length + 1, step):
                fit = np.arange(start, start + length)
                moved = _superpose(ref_ca, pred_ca, fit)
                for cutoff in (d0, max(d0, 4.0)):
                    for _ in range(5):  # refine on the residues within the cutoff
                        close = np.flatnonzero(np.linalg.norm(moved - ref_ca, axis=1) < cutoff)
                        if len(close) < 3 or np.array_equal(close, fit):
                            break
                        fit, moved = close, _superpose(ref_ca, pred_ca, close)
                    candidates.append(moved)
            length //= 2
    best_tm, best_gdt = 0.0, np.zeros(len(GDT_CUTOFFS))
    for c in candidates:
        d = np.linalg.norm(c - ref_ca, axis=1)
        best_tm = max(best_tm, tm_score(d, n_ref))
        best_gdt = np.maximum(best_gdt, [np.sum(d <= t) / n_ref for t in GDT_CUTOFFS])
    return {"tm_score": best_tm, "gdt_ts": float(best_gdt.mean()), "candidates": len(candidates)}


def read_plddt(pred: Chain) -> tuple[np.ndarray, str]:
    """[R] per-residue pLDDT (0-100) of the prediction and where it came from."""
    js = paths.given(pred.path).with_suffix(".json")
    with paths.remote_errors(pred.path):
        found = js.is_file()
        text = js.read_text() if found else ""
    if found:
        try:
            data = json.loads(text)
            plddt = np.asarray(data["plddt"], np.float64)
            if len(plddt) == len(pred.sequence):
                return plddt, "json"
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    b = np.asarray(pred.atoms.b_factor, np.float64)
    out = np.array([b[pred.starts[r]] for r in range(len(pred.sequence))])
    for r in range(len(pred.sequence)):
        names = pred.atoms.atom_name[pred.starts[r] : pred.starts[r + 1]]
        hit = np.flatnonzero(names == "CA")
        if len(hit):
            out[r] = b[pred.starts[r] + hit[0]]
    if out.max() <= 1.0:  # some writers store 0-1
        out = out * 100
    return out, "b_factor"


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def score_pair(pred_spec: str, ref_spec: str) -> dict:
    """Every metric of one prediction against its reference."""
    import biotite.structure as struc

    ref, pred = load_chain(ref_spec), load_chain(pred_spec)
    pairs = align_residues(ref.sequence, pred.sequence)
    ri, pi = _paired_atoms(ref, pred, pairs)
    ca = ref.atoms.atom_name[ri] == "CA"
    if ca.sum() < 3:
        raise InputError(f"{pred.name} vs {ref.name}: fewer than 3 aligned CA atoms")
    ref_atoms, pred_xyz = ref.atoms[ri], pred.atoms.coord[pi]
    ref_ca, pred_ca = ref_atoms[ca], pred_xyz[ca]
    n_ref = len(ref.sequence)
    lddt = float(struc.lddt(ref_atoms, pred_xyz))
    lddt_ca_res = np.asarray(struc.lddt(ref_ca, pred_ca, aggregation="residue"), np.float64)
    fitted = _superpose(ref_ca.coord, pred_ca, np.arange(len(pred_ca)))
    rmsd = float(np.sqrt(np.mean(np.sum((fitted - ref_ca.coord) ** 2, axis=1))))
    search = search_superpositions(ref_ca, pred_ca, n_ref)
    # per-residue pLDDT of the predicted residues holding the paired CAs
    pred_res = np.searchsorted(pred.starts, pi[ca], side="right") - 1
    plddt, plddt_source = read_plddt(pred)
    plddt = plddt[pred_res]
    return {
        "predicted": pred.name,
        "reference": ref.name,
        "reference_length": n_ref,
        "predicted_length": len(pred.sequence),
        "aligned_residues": int(len(pairs)),
        "coverage": len(pairs) / n_ref,
        "sequence_identity": float(
            np.mean([ref.sequence[a] == pred.sequence[b] for a, b in pairs])
        ),
        "paired_atoms": int(len(ri)),
        "lddt": lddt,
        "lddt_ca": float(struc.lddt(ref_ca, pred_ca)),
        "tm_score": search["tm_score"],
        "gdt_ts": search["gdt_ts"],
        "rmsd_ca": rmsd,
        "mean_plddt": float(np.mean(plddt)),
        "plddt_source": plddt_source,
        "plddt_lddt_pearson": _pearson(plddt, lddt_ca_res),
        "per_residue": {"plddt": plddt.tolist(), "lddt_ca": lddt_ca_res.tolist()},
    }


# --------------------------------------------------------------------------------------------------
# Matching predictions to references
# --------------------------------------------------------------------------------------------------
def _structure_files(arg: str) -> list[str]:
    """A folder's structure files (a bucket folder listed), or ``arg`` itself."""
    p = paths.given(split_spec(arg)[0])
    suffixes = PDB_SUFFIXES + CIF_SUFFIXES
    with paths.remote_errors(str(p)):
        folder = p.is_dir()
        found = [
            f
            for f in (p.iterdir() if folder else [])
            if f.name.lower().removesuffix(".gz").endswith(suffixes)
        ]
    if folder:
        files = sorted(str(f) for f in found)
        if not files:
            raise InputError(f"{p}: no PDB/mmCIF files")
        return files
    return [arg]


def _key(spec: str) -> str:
    name = paths.given(split_spec(spec)[0]).name.lower().removesuffix(".gz")
    return name.rsplit(".", 1)[0]


def _absolute(p: str) -> bool:
    return paths.is_remote(p) or Path(p).is_absolute()


def match_pairs(
    predicted: list[str], references: list[str] | None, pairs_tsv: str | None
) -> list[tuple[str, str]]:
    """(prediction, reference) pairs: from a TSV ``predicted<TAB>reference`` (paths relative to
    the TSV; ``#`` lines skipped), or by file name without extension (``1abc.pdb`` <->
    ``1abc.cif``; with two references of one name, the first in name order)."""
    if pairs_tsv:
        tsv = paths.given(pairs_tsv)  # a local path or a bucket URL
        with paths.remote_errors(pairs_tsv):
            if not tsv.is_file():
                raise InputError(f"{tsv}: no such pairs file")
            text = paths.read_text(pairs_tsv, "a TSV of 'predicted<TAB>reference' lines")
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise InputError(f"{tsv}:{n}: expected 'predicted<TAB>reference'")
            out.append(
                tuple(
                    x.strip() if _absolute(x.strip()) else str(tsv.parent / x.strip())
                    for x in parts
                )
            )
        if not out:
            raise InputError(f"{tsv}: no pairs")
        return out
    preds = [f for a in predicted for f in _structure_files(a)]
    refs: dict[str, str] = {}
    for f in [f for a in references or [] for f in _structure_files(a)]:
        refs.setdefault(_key(f), f)
    out, missing = [], []
    for f in preds:
        if _key(f) in refs:
            out.append((f, refs[_key(f)]))
        else:
            missing.append(paths.given(f).name)
    if missing:
        raise InputError(f"no reference structure with the name of {', '.join(missing)}")
    return out


def run(pairs: list[tuple[str, str]], progress: bool = True) -> dict:
    import sys

    from tqdm import tqdm

    per = [
        score_pair(p, r)
        for p, r in tqdm(pairs, desc="structures", file=sys.stderr, disable=not progress)
    ]
    mean = {m: _mean([t[m] for t in per]) for m in (*METRICS, "coverage", "mean_plddt")}
    return {"targets": len(per), "mean": mean, "per_target": per}


def _mean(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def write_table(per: list[dict], path: Path) -> Path:
    cols = [
        "predicted",
        "reference",
        "reference_length",
        "aligned_residues",
        "coverage",
        "lddt",
        "lddt_ca",
        "tm_score",
        "gdt_ts",
        "rmsd_ca",
        "mean_plddt",
        "plddt_lddt_pearson",
    ]
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(cols)
    w.writerows([t[c] for c in cols] for t in per)
    paths.write_text(path, f.getvalue())  # a local file or a bucket object
    return path


def plot(per: list[dict], out: Path) -> list[Path]:
    """lDDT histogram and pLDDT vs per-residue lDDT scatter."""
    from esmjax.evaluate.plot import figure, save

    fig = figure(5.0, 3.8)
    ax = fig.subplots()
    ax.hist([t["lddt"] for t in per], bins=20, range=(0, 1))
    ax.set_xlabel("lDDT (all atom)")
    ax.set_ylabel("targets")
    p1 = save(fig, out / "structures_lddt_hist.png")
    fig = figure(5.0, 4.5)
    ax = fig.subplots()
    for t in per:
        ax.scatter(
            t["per_residue"]["plddt"], np.asarray(t["per_residue"]["lddt_ca"]) * 100, s=6, alpha=0.6
        )
    ax.set_xlabel("predicted pLDDT")
    ax.set_ylabel("CA lDDT x 100")
    ax.plot([0, 100], [0, 100], "k--", lw=0.5)
    p2 = save(fig, out / "structures_plddt_vs_lddt.png")
    return [p1, p2]
