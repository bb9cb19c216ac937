"""``esmjax data build``: bad input named by file and line, --skip-invalid counts, atomic output,
the CLI, Beam."""

import gzip
import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from support.data_fixtures import ROOT, SCOPE_FASTA, built, scope_family_tsv

from esmjax import cli
from esmjax.config import DataConfig
from esmjax.data.build import BuildError, build_dataset
from esmjax.data.pipeline import train_batches
from esmjax.data.source import open_split, read_meta
from esmjax.io.fasta import read_fasta

GOOD = ">a\nMKVLA\n>b\nMKLLT\n>c\nGGSAV\n"


def run_cli(*argv):
    return cli.main(["data", *argv])


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def assert_fails(capsys, tmp_path, argv, pattern):
    """The build exits 2 with one error line matching ``pattern``, and leaves no folder behind."""
    before = set(tmp_path.iterdir())
    assert run_cli("build", *argv, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("esmjax data: error: ")
    assert re.search(pattern, err), err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary folder


def test_bad_fasta_errors_name_file_and_line(tmp_path, capsys):
    f = write(tmp_path / "chars.fa", ">a\nMKV\n>b\nMK1LT\n")
    assert_fails(
        capsys, tmp_path, ["--fasta", str(f)], r"chars\.fa:4: record 'b' has invalid character '1'"
    )
    f = write(tmp_path / "empty.fa", ">a\nMKV\n>b\n>c\nMKL\n")
    assert_fails(capsys, tmp_path, ["--fasta", str(f)], r"empty\.fa:3: record 'b' has no sequence")
    f = write(tmp_path / "binary.fa", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert_fails(capsys, tmp_path, ["--fasta", str(f)], r"binary\.fa: binary content")
    f = write(tmp_path / "page.fa", "<!DOCTYPE html>\n<html><body>Not found</body></html>\n")
    assert_fails(capsys, tmp_path, ["--fasta", str(f)], r"page\.fa:1: not a FASTA file \(HTML")
    whole = gzip.compress(("".join(f">s{i}\nMKVLAGHHT\n" for i in range(5000))).encode())
    f = write(tmp_path / "cut.fa.gz", whole[: len(whole) // 2])
    assert_fails(
        capsys,
        tmp_path,
        ["--fasta", str(f)],
        r"cut\.fa\.gz: gzip stream is corrupt or truncated after line \d+",
    )
    f = write(tmp_path / "dup.fa", GOOD + ">a\nMKT\n")
    assert_fails(
        capsys,
        tmp_path,
        ["--fasta", str(f)],
        r"dup\.fa:7: duplicate record id 'a' \(first at .*dup\.fa:1\)",
    )


def test_bad_membership_errors_name_file_and_line(tmp_path, capsys):
    fa = write(tmp_path / "in.fa", GOOD)
    cases = [
        ("c1\ta\nc1 b\nc2\tc\n", r"t\.tsv:2: malformed membership row 'c1 b'"),
        ("c1\ta\nc1\tb\tx\nc2\tc\n", r"t\.tsv:2: malformed membership row"),
        (
            "c1\ta\nc1\tb\nc2\tc\nc2\tzz\n",
            r"t\.tsv:4: member 'zz' of cluster 'c2' is not a record of any FASTA input",
        ),
        (
            "c1\ta\nc1\tb\nc2\tc\nc2\ta\n",
            r"t\.tsv:4: member 'a' of cluster 'c2' is already listed in cluster 'c1' \(line 1\)",
        ),
        ("c1\ta\nc2\tc\n", r"in\.fa:3: record 'b' is in no cluster of the membership TSV"),
    ]
    for text, pattern in cases:
        tsv = write(tmp_path / "t.tsv", text)
        assert_fails(capsys, tmp_path, ["--fasta", str(fa), "--clusters", str(tsv)], pattern)
        tsv.unlink()
    tsv = write(tmp_path / "t.tsv", b"\x00\x01binary")
    assert_fails(
        capsys,
        tmp_path,
        ["--fasta", str(fa), "--clusters", str(tsv)],
        r"t\.tsv: binary content, not a membership TSV",
    )


def test_skip_invalid_skips_counts_and_summarises(tmp_path, capsys):
    fa = write(
        tmp_path / "in.fa",
        ">a\nMKVLA\n>b\nMK1LT\n>c\n>d\nGGSAV\n>a\nMMMM\n>e\nMKVVV\n>f\nPPPPG\n>g\nAAAAA\n",
    )
    tsv = write(tmp_path / "t.tsv", "c1\ta\nbad line\nc1\td\nc2\te\nc3\tzz\nc3\tb\nc9\ta\n")
    out = tmp_path / "ds"
    argv = [
        "build",
        "--fasta",
        str(fa),
        "--clusters",
        str(tsv),
        "--out",
        str(out),
        "--skip-invalid",
    ]
    assert run_cli(*argv, "--val-fraction", "0") == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    # a, d, e kept; b invalid char; c empty; second a duplicate; f, g in no cluster; bad line
    # malformed;
    # zz and b unknown members (b was skipped); the repeated a in c9 ignored.
    assert summary == (
        "read 8 FASTA records, kept 3; 5 membership rows; skipped: 1 duplicate ids, 1 empty, 1 "
        "invalid character, 1 malformed membership rows, 2 membership rows naming unknown "
        "members, 1 membership rows repeating a member, 2 records in no cluster"
    )
    meta = read_meta(out)
    assert meta["splits"]["train"]["records"] == 3 and meta["splits"]["train"]["clusters"] == 2
    assert meta["stats"]["summary"] == summary


def test_output_is_atomic(tmp_path, capsys):
    # The invalid record comes after thousands of good ones: the failure happens mid-build.
    fa = write(
        tmp_path / "late.fa", "".join(f">s{i}\nMKVLAGHHT\n" for i in range(3000)) + ">bad\nMK#\n"
    )
    assert_fails(
        capsys,
        tmp_path,
        ["--fasta", str(fa)],
        r"late\.fa:6002: record 'bad' has invalid character '#'",
    )
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(BuildError, match="exists"):
        build_dataset([write(tmp_path / "ok.fa", GOOD)], existing)


def test_cli_end_to_end_on_the_bundled_sample(tmp_path, capsys):
    out = tmp_path / "cath"
    assert (
        run_cli(
            "build",
            "--fasta",
            str(ROOT / "data" / "cath_s20.fa.gz"),
            "--out",
            str(out),
            "--val-fraction",
            "0.02",
        )
        == 0
    )
    assert (
        "train 14672 records in 14672 clusters, validation 270 records" in capsys.readouterr().err
    )
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run_cli("inspect", str(out), "--sample", "50", "--seed", "3") == 0
    lines = buf.getvalue().splitlines()
    assert "# validation (held out): 270 records, 270 clusters, 39479 residues" in lines
    samples = [json.loads(x) for x in lines if not x.startswith("#")]
    assert len(samples) == 50 and all(s["id"].startswith("cath|current|") for s in samples)
    with train_batches(DataConfig(train=str(out), seq_len=256), rows=4) as it:
        assert next(it)["tokens"].shape == (4, 256)
    assert "tensorflow" not in sys.modules  # TFDS wrote and read ArrayRecord without TensorFlow


def test_membership_groups_clusters(tmp_path_factory):
    """SCOPe families as clusters: every family's members are consecutive records of one cluster."""
    ds = built(tmp_path_factory, "scope")
    split = open_split(ds, "train")
    offsets = np.asarray(split.offsets)
    names = split.describe(np.arange(split.num_records))
    for c in range(0, split.num_clusters, 97):
        assert len({cl for _, cl in names[offsets[c] : offsets[c + 1]]}) == 1
    assert "tensorflow" not in sys.modules


def test_fast_record_reads_match_tfds_decoding(tmp_path_factory):
    split = open_split(built(tmp_path_factory, "cath"), "validation")
    idx = np.arange(split.num_records)[::-1]
    fast = split.read(idx)  # the token file
    slow = split.source.__getitems__(idx.tolist())  # TFDS's own decoding
    assert all(np.array_equal(a, b["tokens"]) and a.dtype == np.uint8 for a, b in zip(fast, slow))
    assert [len(a) for a in fast] == np.asarray(split.lengths)[idx].tolist()


def test_token_file_holds_the_array_record_tokens_in_record_order(tmp_path_factory):
    """``<split>.tokens.bin`` is every record's residue ids concatenated in record order: its size
    is in the metadata, and reads from it equal the ArrayRecord reads (multi-member clusters)."""
    ds = built(tmp_path_factory, "scope")
    meta = read_meta(ds)
    for name in ("train", "validation"):
        split = open_split(ds, name)
        info = meta["splits"][name]
        data = (ds / f"{name}.tokens.bin").read_bytes()
        assert len(data) == info["tokens_bytes"] == info["residues"] == split.lengths.sum()
        idx = np.arange(split.num_records)
        from_array_record = split.read_array_record(idx)
        assert data == b"".join(a.tobytes() for a in from_array_record)
        rng = np.random.default_rng(0)
        some = rng.integers(0, split.num_records, 2000)
        for a, b in zip(split.read(some), split.read_array_record(some)):
            np.testing.assert_array_equal(a, b)


def test_beam_direct_runner_matches_the_local_build(tmp_path):
    """The Beam pipeline (DirectRunner) writes the same records in the same order as the local
    build."""
    pytest.importorskip("apache_beam")
    labels = scope_family_tsv(tmp_path / "all.tsv").read_text().splitlines()[:1500]
    tsv = write(tmp_path / "fam.tsv", "\n".join(labels) + "\n")
    keep = {line.split("\t")[1] for line in labels}
    fa = write(
        tmp_path / "sub.fa",
        "".join(f">{r.id}\n{r.sequence}\n" for r in read_fasta(SCOPE_FASTA) if r.id in keep),
    )
    local = build_dataset([fa], tmp_path / "local", clusters=tsv, val_fraction=0.1)
    beam = build_dataset(
        [fa], tmp_path / "beam", clusters=tsv, val_fraction=0.1, beam_runner="DirectRunner"
    )
    for s in ("train", "validation"):
        assert local["splits"][s] == beam["splits"][s]
        name = f"{s}.tokens.bin"
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "beam" / name).read_bytes()
    assert beam["stats"]["summary"] == local["stats"]["summary"]
    dup = write(tmp_path / "dup.fa", GOOD + ">b\nMKT\n")
    with pytest.raises(BuildError, match=r"dup\.fa:7: duplicate record id 'b'"):
        build_dataset([dup], tmp_path / "x", val_fraction=0.0, beam_runner="DirectRunner")
    assert not (tmp_path / "x").exists()


def test_builder_imports_neither_back_end():
    """The layering of the build: ``builder`` imports no back-end, the local back-end not the Beam
    one, and a local build does not import Apache Beam (optional, slow to import)."""
    check = (
        "import sys\n"
        "import esmjax.data.builder\n"
        "assert not {'esmjax.data.build_local', 'esmjax.data.build_beam'} & set(sys.modules)\n"
        "import esmjax.data.build_local\n"
        "assert 'esmjax.data.build_beam' not in sys.modules\n"
        "from esmjax.data.build import backend\n"
        "assert type(backend()).__name__ == 'LocalBackend'\n"
        "assert not {'esmjax.data.build_beam', 'apache_beam'} & set(sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
