"""Residue constants as data: the 20 amino acids' heavy atoms, their idealised positions in the 8
rigid groups, the atom14 / atom37 layouts and the default group frames (Jumper et al. 2021, Suppl.
1.8; values as published in AlphaFold's ``common/residue_constants.py`` and used by OpenFold and
ESMFold).

The tables below are text data; the arrays are derived from them once at import:

* ``RESTYPE_DEFAULT_FRAMES`` [21, 8, 4, 4]: each rigid group's frame in its parent (backbone,
  pre-omega, phi, psi, chi1..chi4). Row 20 (unknown, X) is all zeros, exactly as in OpenFold, so X
  residues place no side chain.
* ``RESTYPE_ATOM14_TO_GROUP`` [21, 14], ``RESTYPE_ATOM14_MASK`` [21, 14],
  ``RESTYPE_ATOM14_POSITIONS`` [21, 14, 3]: the compact atom14 layout and each atom's literature
  position in its group.
* ``RESTYPE_ATOM37_TO_ATOM14`` [21, 37], ``RESTYPE_ATOM14_TO_ATOM37`` [21, 14],
  ``RESTYPE_ATOM37_MASK`` [21, 37].

Amino-acid order (AF2 ``restype_order``): A R N D C Q E G H I L K M F P S T W Y V, then X = 20.
"""

from __future__ import annotations

import numpy as np

RESTYPES = tuple("ARNDCQEGHILKMFPSTWYV")
RESTYPES_WITH_X = RESTYPES + ("X",)
RESTYPE_ORDER = {r: i for i, r in enumerate(RESTYPES_WITH_X)}
UNK = RESTYPE_ORDER["X"]
NUM_RESTYPES = 20
RESTYPE_1TO3 = dict(
    zip(
        RESTYPES,
        ("ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL".split()),
    )
)
RESTYPE_3TO1 = {v: k for k, v in RESTYPE_1TO3.items()}

ATOM_TYPES = tuple(
    "N CA C CB O CG CG1 CG2 OG OG1 SG CD CD1 CD2 ND1 ND2 OD1 OD2 SD CE CE1 CE2 CE3 NE NE1 NE2 "
    "OE1 OE2 CH2 NH1 NH2 OH CZ CZ2 CZ3 NZ OXT".split()
)
ATOM_ORDER = {a: i for i, a in enumerate(ATOM_TYPES)}
NUM_ATOM37 = len(ATOM_TYPES)  # 37
NUM_ATOM14 = 14
NUM_GROUPS = 8

# residue, atom, rigid group (0 backbone, 3 psi, 4-7 chi1-4), position in that group's frame
# (Angstrom).
# PRO CD carries AlphaFold's manual adjustment (ring angle 2 degrees larger).
_RIGID_GROUP_POSITIONS = """
ALA N   0  -0.525   1.363   0.000
ALA CA  0   0.000   0.000   0.000
ALA C   0   1.526  -0.000  -0.000
ALA CB  0  -0.529  -0.774  -1.205
ALA O   3   0.627   1.062   0.000
ARG N   0  -0.524   1.362  -0.000
ARG CA  0   0.000   0.000   0.000
ARG C   0   1.525  -0.000  -0.000
ARG CB  0  -0.524  -0.778  -1.209
ARG O   3   0.626   1.062   0.000
ARG CG  4   0.616   1.390  -0.000
ARG CD  5   0.564   1.414   0.000
ARG NE  6   0.539   1.357  -0.000
ARG NH1 7   0.206   2.301   0.000
ARG NH2 7   2.078   0.978  -0.000
ARG CZ  7   0.758   1.093  -0.000
ASN N   0  -0.536   1.357   0.000
ASN CA  0   0.000   0.000   0.000
ASN C   0   1.526  -0.000  -0.000
ASN CB  0  -0.531  -0.787  -1.200
ASN O   3   0.625   1.062   0.000
ASN CG  4   0.584   1.399   0.000
ASN ND2 5   0.593  -1.188   0.001
ASN OD1 5   0.633   1.059   0.000
ASP N   0  -0.525   1.362  -0.000
ASP CA  0   0.000   0.000   0.000
ASP C   0   1.527   0.000  -0.000
ASP CB  0  -0.526  -0.778  -1.208
ASP O   3   0.626   1.062  -0.000
ASP CG  4   0.593   1.398  -0.000
ASP OD1 5   0.610   1.091   0.000
ASP OD2 5   0.592  -1.101  -0.003
CYS N   0  -0.522   1.362  -0.000
CYS CA  0   0.000   0.000   0.000
CYS C   0   1.524   0.000   0.000
CYS CB  0  -0.519  -0.773  -1.212
CYS O   3   0.625   1.062  -0.000
CYS SG  4   0.728   1.653   0.000
GLN N   0  -0.526   1.361  -0.000
GLN CA  0   0.000   0.000   0.000
GLN C   0   1.526   0.000   0.000
GLN CB  0  -0.525  -0.779  -1.207
GLN O   3   0.626   1.062  -0.000
GLN CG  4   0.615   1.393   0.000
GLN CD  5   0.587   1.399  -0.000
GLN NE2 6   0.593  -1.189  -0.001
GLN OE1 6   0.634   1.060   0.000
GLU N   0  -0.528   1.361   0.000
GLU CA  0   0.000   0.000   0.000
GLU C   0   1.526  -0.000  -0.000
GLU CB  0  -0.526  -0.781  -1.207
GLU O   3   0.626   1.062   0.000
GLU CG  4   0.615   1.392   0.000
GLU CD  5   0.600   1.397   0.000
GLU OE1 6   0.607   1.095  -0.000
GLU OE2 6   0.589  -1.104  -0.001
GLY N   0  -0.572   1.337   0.000
GLY CA  0   0.000   0.000   0.000
GLY C   0   1.517  -0.000  -0.000
GLY O   3   0.626   1.062  -0.000
HIS N   0  -0.527   1.360   0.000
HIS CA  0   0.000   0.000   0.000
HIS C   0   1.525   0.000   0.000
HIS CB  0  -0.525  -0.778  -1.208
HIS O   3   0.625   1.063   0.000
HIS CG  4   0.600   1.370  -0.000
HIS CD2 5   0.889  -1.021   0.003
HIS ND1 5   0.744   1.160  -0.000
HIS CE1 5   2.030   0.851   0.002
HIS NE2 5   2.145  -0.466   0.004
ILE N   0  -0.493   1.373  -0.000
ILE CA  0   0.000   0.000   0.000
ILE C   0   1.527  -0.000  -0.000
ILE CB  0  -0.536  -0.793  -1.213
ILE O   3   0.627   1.062  -0.000
ILE CG1 4   0.534   1.437  -0.000
ILE CG2 4   0.540  -0.785  -1.199
ILE CD1 5   0.619   1.391   0.000
LEU N   0  -0.520   1.363   0.000
LEU CA  0   0.000   0.000   0.000
LEU C   0   1.525  -0.000  -0.000
LEU CB  0  -0.522  -0.773  -1.214
LEU O   3   0.625   1.063  -0.000
LEU CG  4   0.678   1.371   0.000
LEU CD1 5   0.530   1.430  -0.000
LEU CD2 5   0.535  -0.774   1.200
LYS N   0  -0.526   1.362  -0.000
LYS CA  0   0.000   0.000   0.000
LYS C   0   1.526   0.000   0.000
LYS CB  0  -0.524  -0.778  -1.208
LYS O   3   0.626   1.062  -0.000
LYS CG  4   0.619   1.390   0.000
LYS CD  5   0.559   1.417   0.000
LYS CE  6   0.560   1.416   0.000
LYS NZ  7   0.554   1.387   0.000
MET N   0  -0.521   1.364  -0.000
MET CA  0   0.000   0.000   0.000
MET C   0   1.525   0.000   0.000
MET CB  0  -0.523  -0.776  -1.210
MET O   3   0.625   1.062  -0.000
MET CG  4   0.613   1.391  -0.000
MET SD  5   0.703   1.695   0.000
MET CE  6   0.320   1.786  -0.000
PHE N   0  -0.518   1.363   0.000
PHE CA  0   0.000   0.000   0.000
PHE C   0   1.524   0.000  -0.000
PHE CB  0  -0.525  -0.776  -1.212
PHE O   3   0.626   1.062  -0.000
PHE CG  4   0.607   1.377   0.000
PHE CD1 5   0.709   1.195  -0.000
PHE CD2 5   0.706  -1.196   0.000
PHE CE1 5   2.102   1.198  -0.000
PHE CE2 5   2.098  -1.201  -0.000
PHE CZ  5   2.794  -0.003  -0.001
PRO N   0  -0.566   1.351  -0.000
PRO CA  0   0.000   0.000   0.000
PRO C   0   1.527  -0.000   0.000
PRO CB  0  -0.546  -0.611  -1.293
PRO O   3   0.621   1.066   0.000
PRO CG  4   0.382   1.445   0.000
PRO CD  5   0.477   1.424   0.000
SER N   0  -0.529   1.360  -0.000
SER CA  0   0.000   0.000   0.000
SER C   0   1.525  -0.000  -0.000
SER CB  0  -0.518  -0.777  -1.211
SER O   3   0.626   1.062  -0.000
SER OG  4   0.503   1.325   0.000
THR N   0  -0.517   1.364   0.000
THR CA  0   0.000   0.000   0.000
THR C   0   1.526   0.000  -0.000
THR CB  0  -0.516  -0.793  -1.215
THR O   3   0.626   1.062   0.000
THR CG2 4   0.550  -0.718  -1.228
THR OG1 4   0.472   1.353   0.000
TRP N   0  -0.521   1.363   0.000
TRP CA  0   0.000   0.000   0.000
TRP C   0   1.525  -0.000   0.000
TRP CB  0  -0.523  -0.776  -1.212
TRP O   3   0.627   1.062   0.000
TRP CG  4   0.609   1.370  -0.000
TRP CD1 5   0.824   1.091   0.000
TRP CD2 5   0.854  -1.148  -0.005
TRP CE2 5   2.186  -0.678  -0.007
TRP CE3 5   0.622  -2.530  -0.007
TRP NE1 5   2.140   0.690  -0.004
TRP CH2 5   3.028  -2.890  -0.013
TRP CZ2 5   3.283  -1.543  -0.011
TRP CZ3 5   1.715  -3.389  -0.011
TYR N   0  -0.522   1.362   0.000
TYR CA  0   0.000   0.000   0.000
TYR C   0   1.524  -0.000  -0.000
TYR CB  0  -0.522  -0.776  -1.213
TYR O   3   0.627   1.062  -0.000
TYR CG  4   0.607   1.382  -0.000
TYR CD1 5   0.716   1.195  -0.000
TYR CD2 5   0.713  -1.194  -0.001
TYR CE1 5   2.107   1.200  -0.002
TYR CE2 5   2.104  -1.201  -0.003
TYR OH  5   4.168  -0.002  -0.005
TYR CZ  5   2.791  -0.001  -0.003
VAL N   0  -0.494   1.373  -0.000
VAL CA  0   0.000   0.000   0.000
VAL C   0   1.527  -0.000  -0.000
VAL CB  0  -0.533  -0.795  -1.213
VAL O   3   0.627   1.062  -0.000
VAL CG1 4   0.540   1.429  -0.000
VAL CG2 4   0.533  -0.776   1.203
"""

# The atom14 order of each residue's heavy atoms (backbone N CA C O first).
_ATOM14_NAMES = """
ALA N CA C O CB
ARG N CA C O CB CG CD NE CZ NH1 NH2
ASN N CA C O CB CG OD1 ND2
ASP N CA C O CB CG OD1 OD2
CYS N CA C O CB SG
GLN N CA C O CB CG CD OE1 NE2
GLU N CA C O CB CG CD OE1 OE2
GLY N CA C O
HIS N CA C O CB CG ND1 CD2 CE1 NE2
ILE N CA C O CB CG1 CG2 CD1
LEU N CA C O CB CG CD1 CD2
LYS N CA C O CB CG CD CE NZ
MET N CA C O CB CG SD CE
PHE N CA C O CB CG CD1 CD2 CE1 CE2 CZ
PRO N CA C O CB CG CD
SER N CA C O CB OG
THR N CA C O CB OG1 CG2
TRP N CA C O CB CG CD1 CD2 NE1 CE2 CE3 CZ2 CZ3 CH2
TYR N CA C O CB CG CD1 CD2 CE1 CE2 CZ OH
VAL N CA C O CB CG1 CG2
"""

# The four atoms defining each chi dihedral, chi1 first.
_CHI_ANGLES_ATOMS = """
ALA
ARG N,CA,CB,CG CA,CB,CG,CD CB,CG,CD,NE CG,CD,NE,CZ
ASN N,CA,CB,CG CA,CB,CG,OD1
ASP N,CA,CB,CG CA,CB,CG,OD1
CYS N,CA,CB,SG
GLN N,CA,CB,CG CA,CB,CG,CD CB,CG,CD,OE1
GLU N,CA,CB,CG CA,CB,CG,CD CB,CG,CD,OE1
GLY
HIS N,CA,CB,CG CA,CB,CG,ND1
ILE N,CA,CB,CG1 CA,CB,CG1,CD1
LEU N,CA,CB,CG CA,CB,CG,CD1
LYS N,CA,CB,CG CA,CB,CG,CD CB,CG,CD,CE CG,CD,CE,NZ
MET N,CA,CB,CG CA,CB,CG,SD CB,CG,SD,CE
PHE N,CA,CB,CG CA,CB,CG,CD1
PRO N,CA,CB,CG CA,CB,CG,CD
SER N,CA,CB,OG
THR N,CA,CB,OG1
TRP N,CA,CB,CG CA,CB,CG,CD1
TYR N,CA,CB,CG CA,CB,CG,CD1
VAL N,CA,CB,CG1
"""


def _parse_positions(text: str) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    out: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for line in text.strip().splitlines():
        res, atom, group, x, y, z = line.split()
        out.setdefault(res, []).append((atom, int(group), np.array([float(x), float(y), float(z)])))
    return out


def _parse_lists(text: str, sep: str | None = None) -> dict[str, list]:
    out = {}
    for line in text.strip().splitlines():
        res, *rest = line.split()
        out[res] = [tuple(r.split(sep)) if sep else r for r in rest]
    return out


RIGID_GROUP_POSITIONS = _parse_positions(_RIGID_GROUP_POSITIONS)
ATOM14_NAMES: dict[str, list[str]] = _parse_lists(_ATOM14_NAMES)
CHI_ANGLES_ATOMS: dict[str, list[tuple[str, ...]]] = {
    r: _parse_lists(_CHI_ANGLES_ATOMS, ",").get(r, []) for r in RESTYPE_3TO1
}


def _frame(ex: np.ndarray, ey: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 frame whose x axis is along ``ex``, y in the (ex, ey) plane, z = x cross y, origin
    ``origin`` (Gram-Schmidt; AF2 Suppl. Alg. 21 builds the backbone frame the same way)."""
    x = ex / np.linalg.norm(ex)
    y = ey - np.dot(ey, x) * x
    y = y / np.linalg.norm(y)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, np.cross(x, y), origin
    return m


def _build() -> dict[str, np.ndarray]:
    frames = np.zeros((21, NUM_GROUPS, 4, 4), np.float32)
    a14_group = np.zeros((21, NUM_ATOM14), np.int32)
    a14_mask = np.zeros((21, NUM_ATOM14), np.float32)
    a14_pos = np.zeros((21, NUM_ATOM14, 3), np.float32)
    a14_to_37 = np.zeros((21, NUM_ATOM14), np.int32)
    a37_to_14 = np.zeros((21, NUM_ATOM37), np.int32)
    a37_mask = np.zeros((21, NUM_ATOM37), np.float32)
    for r, letter in enumerate(RESTYPES):
        name = RESTYPE_1TO3[letter]
        order14 = ATOM14_NAMES[name]
        for i, atom in enumerate(order14):
            a14_to_37[r, i] = ATOM_ORDER[atom]
            a37_to_14[r, ATOM_ORDER[atom]] = i
            a37_mask[r, ATOM_ORDER[atom]] = 1.0
        pos = {}
        for atom, group, xyz in RIGID_GROUP_POSITIONS[name]:
            i = order14.index(atom)
            a14_group[r, i], a14_mask[r, i], a14_pos[r, i] = group, 1.0, xyz
            pos[atom] = xyz
        frames[r, 0] = frames[r, 1] = np.eye(4)  # backbone; pre-omega (no atoms)
        frames[r, 2] = _frame(pos["N"] - pos["CA"], np.array([1.0, 0.0, 0.0]), pos["N"])  # phi
        frames[r, 3] = _frame(pos["C"] - pos["CA"], pos["CA"] - pos["N"], pos["C"])  # psi
        chis = CHI_ANGLES_ATOMS[name]
        if chis:  # chi1 in the backbone frame
            a, b, c = (pos[n] for n in chis[0][:3])
            frames[r, 4] = _frame(c - b, a - b, c)
        for k in range(
            1, len(chis)
        ):  # chi(k+1) in chi(k)'s frame; each axis starts at the previous origin
            end = pos[chis[k][2]]
            frames[r, 4 + k] = _frame(end, np.array([-1.0, 0.0, 0.0]), end)
    return dict(
        frames=frames,
        a14_group=a14_group,
        a14_mask=a14_mask,
        a14_pos=a14_pos,
        a14_to_37=a14_to_37,
        a37_to_14=a37_to_14,
        a37_mask=a37_mask,
    )


_T = _build()
RESTYPE_DEFAULT_FRAMES: np.ndarray = _T["frames"]
RESTYPE_ATOM14_TO_GROUP: np.ndarray = _T["a14_group"]
RESTYPE_ATOM14_MASK: np.ndarray = _T["a14_mask"]
RESTYPE_ATOM14_POSITIONS: np.ndarray = _T["a14_pos"]
RESTYPE_ATOM14_TO_ATOM37: np.ndarray = _T["a14_to_37"]
RESTYPE_ATOM37_TO_ATOM14: np.ndarray = _T["a37_to_14"]
RESTYPE_ATOM37_MASK: np.ndarray = _T["a37_mask"]
del _T
