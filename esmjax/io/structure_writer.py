"""Predicted structures as text: PDB (fixed columns, as wwPDB v3.3 ``ATOM`` records) and a minimal
mmCIF.

Glossary: L residues, A atom37 slots.

A ``Structure`` holds atom37 coordinates and a per-atom mask, per-residue chain index and residue
number, and a per-atom B-factor (ESMFold writes pLDDT there, on 0-100). Chains are lettered A, B,
... in order of their index.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from esmjax.models.geometry import residue_constants as rc

CHAIN_IDS = string.ascii_uppercase + string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Structure:
    """One predicted model.

    Attributes:
      aatype: [L] AF2 residue types (0..20; 20 = X writes as UNK with no side chain).
      atom37: [L, 37, 3] coordinates in Angstrom.
      atom_mask: [L, 37] 1 where an atom is written.
      residue_number: [L] residue numbers as written (1-based per chain).
      chain_index: [L] 0, 1, ... -> chains A, B, ...
      b_factors: [L, 37].
    """

    aatype: np.ndarray
    atom37: np.ndarray
    atom_mask: np.ndarray
    residue_number: np.ndarray
    chain_index: np.ndarray
    b_factors: np.ndarray

    def __post_init__(self) -> None:
        if int(np.max(self.chain_index, initial=0)) >= len(CHAIN_IDS):
            raise ValueError(f"at most {len(CHAIN_IDS)} chains can be written")

    def atoms(self):
        """Yields (residue i, atom name, element, xyz, b-factor) for every written atom, in file
        order."""
        for i in range(len(self.aatype)):
            for a, name in enumerate(rc.ATOM_TYPES):
                if self.atom_mask[i, a] >= 0.5:
                    yield i, name, name[0], self.atom37[i, a], float(self.b_factors[i, a])


def _resname(aatype: int) -> str:
    return rc.RESTYPE_1TO3.get(rc.RESTYPES_WITH_X[int(aatype)], "UNK")


def to_pdb(s: Structure, remark: str = "") -> str:
    """PDB text: one ``ATOM`` line per atom, ``TER`` after each chain, then ``END``."""
    lines = ["REMARK 220 " + remark] if remark else []
    serial = 1
    atoms = list(s.atoms())
    for k, (i, name, element, xyz, b) in enumerate(atoms):
        chain = CHAIN_IDS[int(s.chain_index[i])]
        atom_name = name if len(name) == 4 else f" {name}"
        lines.append(
            f"{'ATOM':<6}{serial:>5} {atom_name:<4} {_resname(s.aatype[i]):>3} "
            f"{chain}{int(s.residue_number[i]):>4}    "
            f"{xyz[0]:>8.3f}{xyz[1]:>8.3f}{xyz[2]:>8.3f}{1.0:>6.2f}{b:>6.2f}          "
            f"{element:>2}  "
        )
        serial += 1
        last_of_chain = k + 1 == len(atoms) or s.chain_index[atoms[k + 1][0]] != s.chain_index[i]
        if last_of_chain:
            lines.append(
                f"{'TER':<6}{serial:>5}      {_resname(s.aatype[i]):>3} "
                f"{chain}{int(s.residue_number[i]):>4}"
            )
            serial += 1
    lines += ["END", ""]
    return "\n".join(lines)


def to_mmcif(s: Structure, name: str = "prediction") -> str:
    """A minimal mmCIF with the ``atom_site`` loop (enough for PyMOL, ChimeraX, gemmi and
    biotite)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "prediction"
    out = [f"data_{safe}", "#", "loop_"]
    cols = (
        "group_PDB id type_symbol label_atom_id label_alt_id label_comp_id label_asym_id "
        "label_entity_id label_seq_id pdbx_PDB_ins_code Cartn_x Cartn_y Cartn_z occupancy "
        "B_iso_or_equiv auth_seq_id auth_asym_id pdbx_PDB_model_num"
    ).split()
    out += [f"_atom_site.{c}" for c in cols]
    for serial, (i, atom, element, xyz, b) in enumerate(s.atoms(), start=1):
        chain = CHAIN_IDS[int(s.chain_index[i])]
        num = int(s.residue_number[i])
        out.append(
            f"ATOM {serial} {element} {atom} . {_resname(s.aatype[i])} {chain} "
            f"{int(s.chain_index[i]) + 1} {num} ? {xyz[0]:.3f} {xyz[1]:.3f} {xyz[2]:.3f} 1.00 "
            f"{b:.2f} {num} {chain} 1"
        )
    out += ["#", ""]
    return "\n".join(out)
