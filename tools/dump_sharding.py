"""Prints the per-parameter sharding table (path, shape, logical axes, PartitionSpec) for a config
and mesh.

    python tools/dump_sharding.py --config configs/esm2_650m.yaml \
        --mesh data=2,fsdp=8,tensor=1 [--rules fsdp_tp]
    # regenerates tests/golden/ (review the diff!):
    python tools/dump_sharding.py --write-golden

Device-free: the model is built abstractly and the rules are applied to the mesh sizes given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esmjax.config import esm2_preset, load_config  # noqa: E402
from esmjax.models.esm2 import abstract_model  # noqa: E402
from esmjax.parallel import sharding as shd  # noqa: E402

# (golden file stem, preset, mesh sizes, rules)
GOLDEN = [
    ("esm2_650m_fsdp8_fsdp", "esm2_t33_650M_UR50D", {"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ("esm2_650m_dp8_dp", "esm2_t33_650M_UR50D", {"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    (
        "esm2_3b_fsdp4_tp2_fsdp_tp",
        "esm2_t36_3B_UR50D",
        {"data": 1, "fsdp": 4, "tensor": 2},
        "fsdp_tp",
    ),
    (
        "esm2_15b_fsdp16_tp4_fsdp_tp",
        "esm2_t48_15B_UR50D",
        {"data": 1, "fsdp": 16, "tensor": 4},
        "fsdp_tp",
    ),
    (
        "esm2_8m_fsdp8_tp2_fsdp_tp",
        "esm2_t6_8M_UR50D",
        {"data": 1, "fsdp": 8, "tensor": 2},
        "fsdp_tp",
    ),
]


def table(preset_or_cfg, sizes: dict[str, int], rules: str) -> str:
    cfg = esm2_preset(preset_or_cfg) if isinstance(preset_or_cfg, str) else preset_or_cfg
    _, abstract = abstract_model(cfg)
    header = f"# mesh {sizes}, rules {rules}\n"
    return header + shd.spec_table(abstract, sizes, shd.resolve_rules(rules))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="training YAML config")
    ap.add_argument("--preset", help="ESM-2 preset name (instead of --config)")
    ap.add_argument(
        "--mesh", default="data=1,fsdp=8,tensor=1", help="mesh sizes, e.g. data=2,fsdp=8,tensor=4"
    )
    ap.add_argument("--rules", help="rule preset (default: the config's)")
    ap.add_argument("--write-golden", action="store_true", help="regenerate tests/golden/*.txt")
    a = ap.parse_args()
    if a.write_golden:
        for stem, preset, sizes, rules in GOLDEN:
            (ROOT / "tests" / "golden" / f"{stem}.txt").write_text(table(preset, sizes, rules))
        return 0
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))}
    if a.config:
        cfg = load_config(a.config)
        print(table(cfg.model, sizes, a.rules or cfg.mesh.rules), end="")
    else:
        print(table(a.preset or "esm2_t33_650M_UR50D", sizes, a.rules or "fsdp"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
