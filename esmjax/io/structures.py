"""Protein chains from PDB and mmCIF files for contact evaluation (biotite parser).

One chain per file becomes a :class:`ChainStructure`: the sequence the model reads, and for each of
its residues the coordinate that defines contacts, CB (CA for glycine), as in CASP and the ESM
papers (Rao et al. 2021; Lin et al. 2023). Conventions, each chosen to keep the map faithful to the
deposited structure:

- Models: the first model of a multi-model (NMR) file.
- Alternate locations: the highest-occupancy one per atom (biotite ``altloc="occupancy"``).
- Residues: polymer amino acids, modified ones included (MSE reads as M through the Chemical
  Component Dictionary's one-letter code; unknown ones as X). Insertion codes make separate residues
  (``52``, ``52A``, ...).
- A non-glycine residue without a CB atom but with N, CA and C gets the ideal virtual CB of
  trRosetta (Yang et al. 2020); with none of these its contacts are unknown (-1).
- Missing residues (``sequence="seqres"``, the default): the model reads the full deposited
  sequence, SEQRES in PDB files, ``pdbx_poly_seq_scheme`` in mmCIF files. mmCIF maps observed
  residues by ``label_seq_id`` (exact); PDB files carry no such index, so the observed residues are
  aligned to SEQRES (global alignment, BLOSUM62, affine gaps, free end gaps: a missing run of
  identical residues is placed as one block, at a terminus when possible). Unobserved residues are
  in the sequence, with unknown (-1) contacts. A file without SEQRES falls back to the observed
  residues.
- ``sequence="observed"``: the model reads only the residues present in the coordinates, in file
  order, chain breaks closed up (what ESM's structure examples do).

A file may be a bucket URL (``gs://``, ``s3://``; ``esmjax.io.paths``): it is read whole into memory
as a local file is (structure files are small), and a failure of the store is one ``InputError``
line naming the URL.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmjax.errors import InputError
from esmjax.io import paths

log = logging.getLogger(__name__)

CONTACT_THRESHOLD = 8.0  # Angstrom, CB-CB
PDB_SUFFIXES = (".pdb", ".ent")
CIF_SUFFIXES = (".cif", ".mmcif")
SEQUENCE_MODES = ("seqres", "observed")


class StructureError(InputError):
    """A structure file that cannot be read or does not hold the requested protein chain."""


@dataclass(frozen=True)
class ChainStructure:
    """One protein chain, residue-indexed by the sequence the model reads.

    Attributes:
      path: the file it came from.
      chain: author chain id.
      sequence: one-letter sequence fed to the model (length L).
      coords: [L, 3] CB (CA for glycine) coordinates; NaN where the residue or the atom is missing.
      observed: [L] True where the residue has coordinates in the file.
      source: ``seqres`` (full deposited sequence) or ``observed`` (residues with coordinates only).
      num_models: models in the file (the first is used).
    """

    path: str
    chain: str
    sequence: str
    coords: np.ndarray
    observed: np.ndarray
    source: str
    num_models: int

    @property
    def name(self) -> str:
        return f"{paths.given(self.path).name}:{self.chain}"

    def contact_map(self, threshold: float = CONTACT_THRESHOLD) -> np.ndarray:
        """[L, L] int8: 1 for CB-CB distance < threshold, 0 for farther, -1 where a coordinate is
        missing."""
        d = np.linalg.norm(self.coords[:, None, :] - self.coords[None, :, :], axis=-1)
        out = (d < threshold).astype(np.int8)
        out[np.isnan(d)] = -1
        return out


def split_spec(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:CHAIN`` (the chain part is the author chain id); ``FILE`` may be a bucket
    URL (``gs://b/1abc.pdb:A``)."""
    if ":" in spec.split("://", 1)[-1] and not _exists(spec):
        path, chain = spec.rsplit(":", 1)
        if chain and len(chain) <= 4 and chain.isalnum():
            return path, chain
    return spec, None


def _exists(spec: str) -> bool:
    with paths.remote_errors(spec):
        return paths.given(spec).exists()


def open_text(path: Path) -> io.StringIO:
    """The whole file (a local path or an ``epath.Path`` of a bucket object) as text."""
    with paths.remote_errors(str(path)):
        raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return io.StringIO(raw.decode("utf-8", errors="replace"))


def file_format(path: Path) -> str:
    """``pdb`` or ``cif``, by the file's suffix (``.gz`` aside)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(PDB_SUFFIXES):
        return "pdb"
    if name.endswith(CIF_SUFFIXES):
        return "cif"
    raise StructureError(
        f"{path}: unknown structure format (expected {', '.join(PDB_SUFFIXES + CIF_SUFFIXES)})"
    )


def one_letter(res_name: str) -> str:
    """The one-letter code of a residue name, ``X`` for one without a single letter."""
    from biotite.structure.info import one_letter_code

    try:
        code = one_letter_code(res_name)
    except Exception:  # a residue name absent from the bundled dictionary
        code = None
    return code if code and len(code) == 1 else "X"


def _representative_coords(atoms) -> tuple[list[str], np.ndarray, list]:
    """Per residue of ``atoms`` (one chain): one-letter code, CB/CA coordinate [R, 3] and its
    residue id key."""
    import biotite.structure as struc

    starts = struc.get_residue_starts(atoms, add_exclusive_stop=True)
    letters, coords, keys = [], np.full((len(starts) - 1, 3), np.nan), []
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        res = atoms[a:b]
        name = str(res.res_name[0])
        letters.append(one_letter(name))
        keys.append((int(res.res_id[0]), str(res.ins_code[0])))
        atom = {
            str(n): c for n, c in zip(res.atom_name[::-1], res.coord[::-1])
        }  # first occurrence wins
        if name == "GLY" and "CA" in atom:
            coords[i] = atom["CA"]
        elif "CB" in atom:
            coords[i] = atom["CB"]
        elif all(k in atom for k in ("N", "CA", "C")):
            coords[i] = virtual_cb(atom["N"], atom["CA"], atom["C"])
    return letters, coords, keys


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Ideal CB from backbone atoms (trRosetta, Yang et al. 2020, PNAS 117:1496)."""
    b = ca - n
    c_ = c - ca
    a = np.cross(b, c_)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * c_ + ca


def polymer_atoms(atoms):
    """The heavy atoms of the amino-acid residues of ``atoms`` (a biotite ``AtomArray``)."""
    import biotite.structure as struc

    atoms = atoms[struc.filter_amino_acids(atoms)]
    return atoms[atoms.element != "H"] if len(atoms) else atoms


def pick_chain(path: Path, available: list[str], chain: str | None) -> str:
    """``chain`` (None: the first of the ``available`` protein chains); one not among them, or
    no chain at all, is a ``StructureError``."""
    if not available:
        raise StructureError(f"{path}: no protein chain in the first model")
    if chain is None:
        return available[0]
    if chain not in available:
        raise StructureError(
            f"{path}: no protein chain {chain!r}; protein chains: {', '.join(available)}"
        )
    return chain


# --------------------------------------------------------------------------------------------------
# PDB
# --------------------------------------------------------------------------------------------------
def _seqres(lines: list[str]) -> dict[str, list[str]]:
    """SEQRES residue names per chain (PDB format columns: chain 12, names 20-70)."""
    out: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("SEQRES"):
            out.setdefault(line[11], []).extend(line[19:80].split())
    return out


def align_to_seqres(
    path: Path, chain: str, seqres: str, observed: str, hetero: np.ndarray
) -> np.ndarray:
    """Index into ``seqres`` of each observed residue (-1: HETATM residue left out of SEQRES)."""
    import biotite.sequence as bseq
    import biotite.sequence.align as balign

    alphabet_ok = set(bseq.ProteinSequence.alphabet.get_symbols())
    clean = lambda s: "".join(ch if ch in alphabet_ok else "X" for ch in s)  # noqa: E731
    matrix = balign.SubstitutionMatrix.std_protein_matrix()
    ali = balign.align_optimal(
        bseq.ProteinSequence(clean(seqres)),
        bseq.ProteinSequence(clean(observed)),
        matrix,
        gap_penalty=(-10, -1),
        terminal_penalty=False,
    )[0]
    index = np.full(len(observed), -1, np.int64)
    for i_ref, i_obs in ali.trace:
        if i_obs >= 0:
            index[i_obs] = i_ref
    lost = np.flatnonzero(index < 0)
    if (~hetero[lost]).any():
        first = int(lost[~hetero[lost]][0])
        raise StructureError(
            f"{path}: chain {chain}: observed residue {first + 1} ({observed[first]}) does not "
            "align to SEQRES; the SEQRES records do not describe this chain"
        )
    same = np.array([seqres[j] == observed[i] for i, j in enumerate(index) if j >= 0])
    if same.size and same.mean() < 0.9:
        raise StructureError(
            f"{path}: chain {chain}: observed residues match SEQRES at only {same.mean():.0%} of "
            "aligned positions"
        )
    if lost.size:
        log.warning(
            "%s: chain %s: %d HETATM residue(s) outside SEQRES left out", path, chain, lost.size
        )
    return index


def _read_pdb(path: Path, chain: str | None, mode: str) -> ChainStructure:
    import biotite.structure.io.pdb as pdb

    f = pdb.PDBFile.read(open_text(path))
    n_models = f.get_model_count()
    if n_models == 0:
        raise StructureError(f"{path}: no ATOM/HETATM records")
    atoms = polymer_atoms(f.get_structure(model=1, altloc="occupancy"))
    chains = list(dict.fromkeys(str(c) for c in atoms.chain_id))
    chain = pick_chain(path, chains, chain)
    atoms = atoms[atoms.chain_id == chain]
    letters, coords, _ = _representative_coords(atoms)
    observed_seq = "".join(letters)
    seqres_names = _seqres(f.lines).get(chain)
    if mode == "observed" or not seqres_names:
        return ChainStructure(
            str(path),
            chain,
            observed_seq,
            coords,
            np.ones(len(letters), bool),
            "observed",
            n_models,
        )
    seqres = "".join(one_letter(n) for n in seqres_names)
    import biotite.structure as struc

    starts = struc.get_residue_starts(atoms)
    index = align_to_seqres(
        path, chain, seqres, observed_seq, np.asarray(atoms.hetero[starts], bool)
    )
    full = np.full((len(seqres), 3), np.nan)
    seen = np.zeros(len(seqres), bool)
    keep = index >= 0
    full[index[keep]] = coords[keep]
    seen[index[keep]] = True
    return ChainStructure(str(path), chain, seqres, full, seen, "seqres", n_models)


# --------------------------------------------------------------------------------------------------
# mmCIF
# --------------------------------------------------------------------------------------------------
def _read_cif(path: Path, chain: str | None, mode: str) -> ChainStructure:
    import biotite.structure.io.pdbx as pdbx

    f = pdbx.CIFFile.read(open_text(path))
    block = f.block
    n_models = pdbx.get_model_count(f)
    if n_models == 0:
        raise StructureError(f"{path}: no atom_site records")
    # label_* fields: res_id is label_seq_id, the index into the entity sequence; chain_id is
    # label_asym_id.
    atoms = polymer_atoms(
        pdbx.get_structure(f, model=1, altloc="occupancy", use_author_fields=False)
    )
    scheme = block["pdbx_poly_seq_scheme"] if "pdbx_poly_seq_scheme" in block else None
    if scheme is not None:
        asym = scheme["asym_id"].as_array(str)
        strand = scheme["pdb_strand_id"].as_array(str)
        seq_id = scheme["seq_id"].as_array(int)
        mon = scheme["mon_id"].as_array(str)
    present = set(str(c) for c in atoms.chain_id)
    asym_to_author: dict[str, str] = {}
    if scheme is not None:
        for a, s in zip(asym, strand):
            if a in present:
                asym_to_author.setdefault(a, s)
    else:
        site = block["atom_site"]
        for a, s in zip(site["label_asym_id"].as_array(str), site["auth_asym_id"].as_array(str)):
            if a in present:
                asym_to_author.setdefault(a, s)
    author_chains = list(
        dict.fromkeys(asym_to_author[a] for a in dict.fromkeys(str(c) for c in atoms.chain_id))
    )
    chain = pick_chain(path, author_chains, chain)
    label = next(a for a, s in asym_to_author.items() if s == chain)
    atoms = atoms[atoms.chain_id == label]
    letters, coords, keys = _representative_coords(atoms)
    if mode == "observed" or scheme is None:
        return ChainStructure(
            str(path),
            chain,
            "".join(letters),
            coords,
            np.ones(len(letters), bool),
            "observed",
            n_models,
        )
    rows = asym == label
    ids, names = seq_id[rows], mon[rows]
    order: dict[int, str] = {}
    for i, n in zip(ids, names):  # microheterogeneity: the first component listed for a position
        order.setdefault(int(i), n)
    positions = sorted(order)
    if positions != list(range(1, len(positions) + 1)):
        raise StructureError(f"{path}: chain {chain}: pdbx_poly_seq_scheme seq_id is not 1..N")
    seqres = "".join(one_letter(order[i]) for i in positions)
    full = np.full((len(seqres), 3), np.nan)
    seen = np.zeros(len(seqres), bool)
    for (res_id, _), xyz in zip(keys, coords):
        if not 1 <= res_id <= len(seqres):
            raise StructureError(
                f"{path}: chain {chain}: label_seq_id {res_id} outside the sequence "
                f"1..{len(seqres)}"
            )
        full[res_id - 1] = xyz
        seen[res_id - 1] = True
    return ChainStructure(str(path), chain, seqres, full, seen, "seqres", n_models)


def read_chain(spec: str, chain: str | None = None, sequence: str = "seqres") -> ChainStructure:
    """Reads one protein chain. ``spec`` is ``FILE`` or ``FILE:CHAIN``; the default chain is the
    first protein one.

    Raises:
      StructureError: the file is missing, does not parse, or holds no such protein chain.
    """
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"sequence must be one of {SEQUENCE_MODES}, got {sequence!r}")
    try:
        import biotite.structure  # noqa: F401
    except ImportError:
        raise InputError("reading structures needs biotite: pip install 'esmjax[eval]'") from None
    path_str, spec_chain = split_spec(spec)
    path = paths.given(path_str)
    chain = chain or spec_chain
    with paths.remote_errors(path_str):
        if not path.is_file():
            raise StructureError(f"{path}: no such structure file")
    fmt = file_format(path)
    try:
        out = _read_pdb(path, chain, sequence) if fmt == "pdb" else _read_cif(path, chain, sequence)
    except InputError:  # StructureError, or the store failing (open_text)
        raise
    except Exception as e:  # biotite raises a variety of types for malformed files
        raise StructureError(
            f"{path}: cannot parse as {'PDB' if fmt == 'pdb' else 'mmCIF'}: {type(e).__name__}: {e}"
        ) from None
    if not np.isfinite(out.coords).all(-1).any():
        raise StructureError(f"{path}: chain {out.chain}: no residue with a CB/CA coordinate")
    return out
