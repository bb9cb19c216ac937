"""Every bad input is one line (issue 11 §7): each case runs through ``esmjax.cli.main`` in-process
and must exit 2 with a single ``esmjax CMD: error: ...`` line naming the file or key, and no
traceback. The mesh cases are issue 11 §3 (no silent replication) seen from the command line."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from esmjax.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# Width 36: fsdp=8 (the 8 test devices) does not divide it, so the rules would replicate it.
ODD_MODEL = {"preset": "tiny", "embed_dim": 36, "num_heads": 3, "mlp_dim": 144}
# Data that exists: the cases found once the devices are known need a config that passes the
# checks made before the start-up (esmjax.commands.train), the data named and present among them.
DATA = {"train": str(ROOT / "data" / "cath_s20.fa.gz")}


def error_line(capsys, argv: list[str]) -> str:
    """Runs the CLI; asserts exit code 2, no traceback and exactly one error line; returns it."""
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"esmjax {argv[0]}: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def write_config(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


# (config tree, expected text, found while loading the config: then the line starts with the file)
TRAIN_CASES = {
    "num_heads": (
        {"model": {"preset": "esm2_t6_8M_UR50D", "num_heads": 7}},
        "model.num_heads: 7 does not divide model.embed_dim 320",
        True,
    ),
    "preset": ({"model": "esm2_t6_8M"}, "model.preset: unknown ESM-2 preset 'esm2_t6_8M'", True),
    "dtype": (
        {"model": {"preset": "tiny", "dtype": "fp16"}},
        "model.dtype: must be one of float32, bfloat16, got 'fp16'",
        True,
    ),
    "remat": (
        {"model": {"preset": "tiny", "remat": "everything"}},
        "model.remat: must be one of none, full, dots, dots_no_batch, got 'everything'",
        True,
    ),
    "rules": (
        {"model": "tiny", "mesh": {"rules": "bogus"}},
        "mesh.rules: unknown sharding rules 'bogus'",
        True,
    ),
    "rule_axes": (
        {"model": "tiny", "mesh": {"rules": [["embed", ["fsdpp"]]]}},
        "mesh.rules: rule 'embed' names unknown mesh axes ['fsdpp']",
        True,
    ),
    "ici": (
        {"model": "tiny", "mesh": {"ici_tensor": 0}},
        "mesh.ici_tensor: must be a positive size",
        True,
    ),
    # Ranges, checked when the config is loaded (issue 28 item 7; each was a traceback or a late
    # failure, or silently accepted).
    "seq_len_0": (
        {"model": "tiny", "data": {"seq_len": 0}},
        "data.seq_len: must be >= 3 (BOS, a residue, EOS), got 0",
        True,
    ),
    "seq_len_negative": (
        {"model": "tiny", "data": {"seq_len": -128}},
        "data.seq_len: must be >= 3",
        True,
    ),
    "tokens_negative": (
        {"model": "tiny", "data": {"seq_len": 64, "tokens_per_step": -5}},
        "data.tokens_per_step: must be positive, got -5",
        True,
    ),
    "tokens_not_rows": (
        {"model": "tiny", "data": {"seq_len": 64, "tokens_per_step": 1000}},
        "data.tokens_per_step: must be a multiple of data.seq_len=64, got 1000",
        True,
    ),
    "every_0": (
        {"model": "tiny", "checkpoint": {"every": 0}},
        "checkpoint.every: must be >= 1",
        True,
    ),
    "keep_0": (
        {"model": "tiny", "checkpoint": {"keep": 0}},
        "checkpoint.keep: must be >= 1 (a run must keep its latest checkpoint), got 0",
        True,
    ),
    "keep_negative": (
        {"model": "tiny", "checkpoint": {"keep": -1}},
        "checkpoint.keep: must be >= 1",
        True,
    ),
    "num_steps_negative": ({"model": "tiny", "num_steps": -3}, "num_steps: must be >= 0", True),
    "mask_prob": (
        {"model": "tiny", "data": {"mask_prob": 1.5}},
        "data.mask_prob: must be in (0, 1], got 1.5",
        True,
    ),
    "peak_lr_0": (
        {"model": "tiny", "optim": {"peak_lr": 0}},
        "optim.peak_lr: must be positive",
        True,
    ),
    # 3 devices asked for, 8 present.
    "devices": (
        {"model": "tiny", "data": DATA, "mesh": {"ici_fsdp": 3}},
        "needs 3 devices, but 8 are present",
        False,
    ),
    # §3: the devices cannot shard the model; refused before any data is read.
    "replicated": (
        {"model": ODD_MODEL, "data": DATA},
        "not divisible by mesh axis fsdp=8",
        False,
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_config_errors(capsys, tmp_path, case):
    tree, expected, at_load = TRAIN_CASES[case]
    cfg = write_config(tmp_path, tree)
    work = tmp_path / "run"
    line = error_line(
        capsys, ["train", "--no-progress", "--config", str(cfg), "--workdir", str(work)]
    )
    assert (f"error: {cfg}: {expected}" if at_load else expected) in line, line
    assert not work.exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_config_values(capsys, tmp_path, value):
    """YAML reads .nan and .inf as floats: a NaN learning rate trained NaN losses and exited 0."""
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(f"model: tiny\noptim:\n  peak_lr: {value}\n")
    line = error_line(capsys, ["train", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert f"{cfg}: optim.peak_lr: must be a finite number" in line, line
    line = error_line(
        capsys,
        ["train", "--config", DEMO, "--workdir", str(tmp_path / "w"), "--set", "optim.b1=.nan"],
    )
    assert "optim.b1: must be a finite number, got nan" in line, line
    assert not (tmp_path / "w").exists()


def test_set_overrides_name_the_key(capsys, tmp_path):
    line = error_line(
        capsys,
        ["train", "--config", DEMO, "--workdir", str(tmp_path / "w"), "--set", "mesh.rules=zero3"],
    )
    assert f"{DEMO}: mesh.rules: unknown sharding rules 'zero3'" in line
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("model: [tiny\n")
    line = error_line(
        capsys, ["train", "--config", str(bad_yaml), "--workdir", str(tmp_path / "w")]
    )
    assert f"{bad_yaml}: not valid YAML" in line


@pytest.mark.parametrize(
    "mesh,expected",
    [
        ("data=x", "--mesh: data='x' is not a whole number"),
        ("pipeline=2", "--mesh: unknown axis 'pipeline'"),
        ("data=1,fsdp=16", "--mesh: the mesh needs 16 devices but only 8 are present"),
    ],
)
def test_plan_errors(capsys, mesh, expected):
    assert expected in error_line(capsys, ["plan", "--config", DEMO, "--mesh", mesh])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--target", "v9x-8"], "--target: 'v9x-8' is not a target; use a Cloud TPU name"),
        (["--target", "v5p-24"], "--target: v5p slices come in powers of two from 4 chips, got 12"),
        (["--target", "h100-12"], "--target: 12 GPUs do not fill hosts of 8"),
        (["--target", "h100", "--slices", "2"], "--slices is for TPU targets"),
        (["--target", "v5p-8", "--mesh", "data=1,fsdp=8"], "--mesh data=1,fsdp=8 has 8 devices;"),
        (["--target", "v5p-8", "--json", "/no/such/dir/p.json"], "--json /no/such/dir/p.json"),
    ],
)
def test_plan_target_errors(capsys, argv, expected):
    """Checked before any compiler starts."""
    assert expected in error_line(capsys, ["plan", "--config", DEMO, *argv])


def test_plan_config_error(capsys, tmp_path):
    cfg = write_config(tmp_path, {"model": "tiny", "mesh": {"rules": "bogus"}})
    line = error_line(capsys, ["plan", "--config", str(cfg), "--mesh", "data=1,fsdp=8"])
    assert f"{cfg}: mesh.rules: unknown sharding rules 'bogus'" in line


def test_legacy_torch_pt(capsys, tmp_path):
    """torch.save before 1.6 wrote a bare pickle, not a zip archive."""
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    path.write_bytes(pickle.dumps({"model": {}, "args": None}, protocol=2))
    line = error_line(capsys, ["convert", str(path), str(tmp_path / "out")])
    assert f"{path}: legacy (pre-1.6, non-zip) torch serialization is not supported" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_config_error(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model": {"preset": "tiny", "num_heads": 5}}))
    fasta = tmp_path / "x.fa"
    fasta.write_text(">a\nMKTAYIAK\n")
    line = error_line(
        capsys,
        ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(tmp_path / "o")],
    )
    assert f"{ckpt / 'config.json'}: model.num_heads: 5 does not divide model.embed_dim 32" in line


# --------------------------------------------------------------------------------------------------
# Fail fast (issue 26 §9): a bad input is found before the distributed start-up, which on a pod can
# take minutes and logs the devices. Each case runs the CLI in a fresh process told to join a
# 2-process job whose coordinator never answers: a command that started up before checking its
# input would wait there (JAX gives up after minutes), so the time limit is the test of the order.
# --------------------------------------------------------------------------------------------------
def _unanswered_coordinator() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def only_error_line(argv: list[str], cwd: Path) -> str:
    """Runs ``esmjax ARGV`` as process 1 of 2 with no coordinator; asserts exit code 2 and that
    stderr is exactly one ``esmjax CMD: error: ...`` line (no device or INFO log line before it);
    returns it."""
    env = {
        **os.environ,
        "ESMJAX_COORDINATOR": _unanswered_coordinator(),
        "ESMJAX_NUM_PROCESSES": "2",
        "ESMJAX_PROCESS_ID": "1",
        "ESMJAX_LOG": "INFO",
    }
    cmd = [sys.executable, "-m", "esmjax.cli", *argv]
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"esmjax {argv[0]} still ran after {e.timeout:.0f} s: it waited for the distributed "
            f"start-up before checking its input; stderr: {e.stderr!r}"
        )
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "process 0 of" not in err and " INFO " not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"esmjax {argv[0]}: error: "), err[-3000:]
    return lines[0]


@pytest.fixture
def inputs(tmp_path):
    """A FASTA, a (weightless) ESM-2 and ESMFold checkpoint folder: their config.json is all that
    the checks read."""
    (tmp_path / "x.fa").write_text(">a\nMKTAYIAK\n")
    for name, tree in (("esm2", {}), ("esmfold", {"esmfold": {}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"model": {"preset": "tiny"}, **tree})
        )
    return tmp_path


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["evaluate", "perplexity", "--checkpoint", "missing/"], "missing/: not an esmjax check"),
        # an evaluation's own input, checked before its restore starts up
        (
            ["evaluate", "variants", "--checkpoint", "esm2", "--dms", "no.csv"],
            "no.csv: no such file",
        ),
        (["train", "--config", "missing.yaml", "--workdir", "w"], "config file missing.yaml does"),
        (["train", "--config", "bad.yaml", "--workdir", "w"], "bad.yaml: not valid YAML"),
        (["train", "--config", "heads.yaml", "--workdir", "w"], "heads.yaml: model.num_heads: 7"),
        (["train", "--config", "nodata.yaml", "--workdir", "w"], "nodata: no such file or folder"),
        (["finetune", "--config", "task.yaml", "--workdir", "w"], "task.yaml: task 'bogus': one"),
        (["finetune", "--config", "bad.yaml", "--workdir", "w"], "bad.yaml: not valid YAML"),
        (["finetune", "--config", "nocsv.yaml", "--workdir", "w"], "nocsv.csv: no such file"),
    ],
)
def test_bad_input_before_startup(inputs, argv, expected):
    (inputs / "bad.yaml").write_text("model: [tiny\n")
    (inputs / "heads.yaml").write_text(json.dumps({"model": {"preset": "tiny", "num_heads": 7}}))
    (inputs / "nodata.yaml").write_text(json.dumps({"model": "tiny", "data": {"train": "nodata"}}))
    (inputs / "task.yaml").write_text(json.dumps({"backbone": "esm2", "task": "bogus"}))
    ft = {"backbone": "esm2", "data": {"csv": "nocsv.csv"}}
    (inputs / "nocsv.yaml").write_text(json.dumps(ft))
    assert expected in only_error_line(argv, inputs)
    assert not (inputs / "w").exists()


@pytest.mark.parametrize("command", ["embed", "fold"])
@pytest.mark.parametrize("missing", ["checkpoint", "fasta"])
def test_inference_inputs_before_output(inputs, command, missing):
    """A missing checkpoint or FASTA is the only line, and leaves no --out folder behind."""
    ckpt = "esm2" if command == "embed" else "esmfold"
    argv = [command, "--checkpoint", ckpt, "--fasta", "x.fa", "--out", "out"]
    argv[argv.index(f"--{missing}") + 1] = "missing"
    line = only_error_line(argv, inputs)
    assert line.startswith(f"esmjax {command}: error: missing: "), line
    assert not (inputs / "out").exists()
