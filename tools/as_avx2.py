"""Run a script as if this x86 CPU had no AVX-512: the closest stand-in for an AVX2-only machine.

    python tools/as_avx2.py tools/bench_train.py --preset esm2_t6_8M_UR50D --steps 3
    python tools/as_avx2.py -m esmjax.cli embed ...

Issue 14 sets its CPU targets on a machine without AVX-512; when only an AVX-512 host is at hand,
this caps every kernel library of both benchmark sides at AVX2 (with FMA), then runs the script or
module with the remaining arguments:

- XLA's generated code: ``--xla_cpu_max_isa=AVX2`` (appended to ``XLA_FLAGS``).
- XLA's matmul and fused kernels (YNNPACK, chosen at run time from CPUID): YNNPACK caches the
  instruction sets it found in one static variable, ``ynn::get_supported_arch_flags()::flags``.
  It is located through jaxlib's symbol table, initialised, and its AVX-512 bits are cleared
  before any computation runs. A jaxlib without that symbol stops here with an error; nothing is
  run half-capped.
- PyTorch: ``ATEN_CPU_CAPABILITY=avx2`` (ATen's kernels), ``ONEDNN_MAX_CPU_ISA=AVX2`` and
  ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (its matmul libraries).

What it cannot change: the microarchitecture (core, caches, memory) stays this machine's, so its
figures are not those of a real AVX2 machine, only of this one without AVX-512 instructions.
``--report`` prints what was capped and exits.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import struct
import sys
from pathlib import Path

# ynnpack/base/arch.h, x86: sse2 1, ssse3 2, sse41 4, avx 8, f16c 16, avx2 32, fma3 64; avx512f,
# avx512bw, avx512vl, avx512dq, avx512bf16, avx512fp16, avx512vnni are bits 7-13, AMX 14-16.
_YNN_AVX2_AND_BELOW = (1 << 7) - 1
_YNN_AVX512_NAMES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512bf16", "avx512fp16",
                     "avx512vnni")  # fmt: skip
_FLAGS = "_ZZN3ynn24get_supported_arch_flagsEvE5flags"
_GETTER = "_ZN3ynn24get_supported_arch_flagsEv"
_TORCH_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def elf_symbols(path: Path, names: set[str]) -> dict[str, int]:
    """Values (load-relative addresses) of the named symbols in an ELF64 little-endian file's
    ``.symtab`` (the full symbol table, which keeps local symbols that ``.dynsym`` drops)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"{path}: not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    found: dict[str, int] = {}
    for _name, sh_type, _f, _a, offset, size, link, _i, _al, _entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        str_off, str_size = sections[link][4], sections[link][5]
        strtab = data[str_off : str_off + str_size]
        wanted = {}  # string-table offset -> name
        for name in names:
            at = strtab.find(b"\0" + name.encode() + b"\0")
            if at >= 0:
                wanted[at + 1] = name
        symtab = data[offset : offset + size]
        for sym in struct.iter_unpack("<IBBHQQ", symtab):  # st_name ... st_value, st_size
            if sym[0] in wanted:
                found[wanted[sym[0]]] = sym[4]
    return found


def _load_base(path: Path) -> int:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path) and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise SystemExit(f"{path} is not mapped in this process")


def cap_ynnpack() -> tuple[int, int]:
    """Clears the AVX-512 bits of YNNPACK's cached instruction sets -> (found, now)."""
    import jaxlib

    lib = Path(jaxlib.__file__).resolve().parent / "libjax_common.so"
    import jax  # noqa: F401  (loads libjax_common.so)

    syms = elf_symbols(lib, {_FLAGS, _GETTER})
    if set(syms) != {_FLAGS, _GETTER}:
        raise SystemExit(
            f"{lib}: YNNPACK's instruction-set cache ({_FLAGS}) is not in this jaxlib's symbol "
            "table; its AVX-512 kernels cannot be capped, so nothing was run"
        )
    base = _load_base(lib)
    found = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + syms[_GETTER])()  # initialises the cache
    ctypes.c_uint64.from_address(base + syms[_FLAGS]).value = found & _YNN_AVX2_AND_BELOW
    now = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + syms[_GETTER])()
    if now != found & _YNN_AVX2_AND_BELOW:
        raise SystemExit(f"YNNPACK's instruction sets read back as {now:#x}, not capped")
    return found, now


def cap() -> dict[str, object]:
    """Caps XLA, YNNPACK and PyTorch at AVX2 in this process; call before anything computes."""
    if "torch" in sys.modules:
        raise SystemExit("torch is already imported: its instruction set can no longer be capped")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa=AVX2".strip()
    os.environ.update(_TORCH_ENV)
    found, now = cap_ynnpack()
    dropped = [n for i, n in enumerate(_YNN_AVX512_NAMES) if found & (1 << (7 + i))]
    return {
        "xla_flags": os.environ["XLA_FLAGS"],
        "ynnpack_flags": f"{found:#x} -> {now:#x}",
        "ynnpack_dropped": dropped or "none (this CPU has no AVX-512)",
        **{k: os.environ[k] for k in _TORCH_ENV},
    }


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    report = cap()
    if argv[0] == "--report":
        try:
            import torch

            report["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        except ImportError:
            report["torch_cpu_capability"] = "torch not installed"
        for k, v in report.items():
            print(f"{k:24s} {v}")
        return 0
    print(f"[as_avx2] {report['ynnpack_flags']}, {report['xla_flags']}", file=sys.stderr)
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
