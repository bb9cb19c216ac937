"""tools/as_avx2.py: every kernel library of both benchmark sides is capped at AVX2 before the
wrapped script runs, the script sees its own arguments, and its numerics are unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import as_avx2  # noqa: E402


def run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "as_avx2.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_report_caps_ynnpack_xla_and_torch():
    proc = run("--report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    found, now = (int(x, 16) for x in report["ynnpack_flags"].split(" -> "))
    assert now == found & 0x7F, report  # every AVX-512 (and AMX) bit cleared
    assert now & (1 << 5), report  # the AVX2 kernels stay available
    assert report["xla_flags"] == "--xla_cpu_max_isa=AVX2"
    assert report["ATEN_CPU_CAPABILITY"] == "avx2"
    assert report["torch_cpu_capability"] == "AVX2"


def test_wrapped_script_gets_its_arguments_and_computes_the_same(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "import numpy as np, jax, jax.numpy as jnp, torch\n"
        "r = np.random.default_rng(0)\n"
        "a, b = r.standard_normal((300, 200)), r.standard_normal((200, 100))\n"
        "want = np.tanh(a @ b / 10)\n"
        "f = jax.jit(lambda x, y: jnp.tanh(x @ y / 10))\n"
        "got = np.asarray(f(a.astype('f4'), b.astype('f4')))\n"
        "tt = torch.tanh(torch.from_numpy(a).float() @ torch.from_numpy(b).float() / 10).numpy()\n"
        "print(json.dumps({'argv': sys.argv, 'flags': os.environ['XLA_FLAGS'],\n"
        "    'jax_err': float(abs(got - want).max()), 'torch_err': float(abs(tt - want).max()),\n"
        "    'torch_isa': torch.backends.cpu.get_cpu_capability()}))\n"
    )
    proc = run(str(script), "--flag", "value")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["argv"] == [str(script), "--flag", "value"]
    assert "--xla_cpu_max_isa=AVX2" in out["flags"]
    assert out["torch_isa"] == "AVX2"
    assert out["jax_err"] < 1e-5 and out["torch_err"] < 1e-5
    assert "[as_avx2] 0x" in proc.stderr


def test_symbol_lookup_and_bad_input(tmp_path):
    assert as_avx2.elf_symbols(Path(sys.executable).resolve(), {"no_such_symbol_zz9"}) == {}
    text = tmp_path / "not_elf"
    text.write_text("hello")
    with pytest.raises(SystemExit, match="not a 64-bit little-endian ELF"):
        as_avx2.elf_symbols(text, {"x"})
