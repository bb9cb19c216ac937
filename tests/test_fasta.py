"""The streaming FASTA reader: multi-line records, case, trailing '*', and clear errors."""

import gzip

import pytest

from esmjax.io.fasta import FastaError, FastaStats, read_fasta, sanitize_id


def write(tmp_path, text, name="x.fa"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_multiline_lowercase_and_stop(tmp_path):
    p = write(tmp_path, ">sp|P1|A desc here\nmkt\nVRQ*\n\n>r2\nACD\nEF\n")
    recs = list(read_fasta(p))
    assert [(r.id, r.sequence, r.line) for r in recs] == [
        ("sp|P1|A", "MKTVRQ", 1),
        ("r2", "ACDEF", 5),
    ]
    assert recs[0].description == "sp|P1|A desc here"


def test_gzip(tmp_path):
    p = tmp_path / "x.fa.gz"
    with gzip.open(p, "wt") as f:
        f.write(">a\nACD\n>b\nEFG\n")
    assert [r.sequence for r in read_fasta(p)] == ["ACD", "EFG"]


def test_invalid_character_names_record_line_and_position(tmp_path):
    p = write(tmp_path, ">ok\nACD\n>bad one\nACDEF\nGH1K\n")
    with pytest.raises(
        FastaError, match=r"x\.fa:5: record 'bad' has invalid character '1' at residue 8"
    ):
        list(read_fasta(p))
    recs = list(read_fasta(p, unknown_as_x=True))
    assert recs[1].sequence == "ACDEFGHXK"


def test_star_inside_is_invalid(tmp_path):
    with pytest.raises(FastaError, match="invalid character '\\*' at residue 2"):
        list(read_fasta(write(tmp_path, ">a\nA*C\n")))


def test_empty_record_and_skip_invalid(tmp_path):
    p = write(tmp_path, ">a\nACD\n>empty\n>c\nAC9\n>d\nKK\n")
    with pytest.raises(FastaError, match="record 'empty' has no sequence"):
        list(read_fasta(p))
    stats = FastaStats()
    recs = list(read_fasta(p, skip_invalid=True, stats=stats))
    assert [r.id for r in recs] == ["a", "d"]
    assert stats.skipped == 2 and stats.records == 2
    assert "2 records skipped" in stats.summary()


def test_not_fasta(tmp_path):
    with pytest.raises(FastaError, match="HTML"):
        list(read_fasta(write(tmp_path, "<!DOCTYPE html><html></html>\n")))
    b = tmp_path / "bin.fa"
    b.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(FastaError, match="binary"):
        list(read_fasta(b))
    with pytest.raises(FastaError, match="no FASTA records"):
        list(read_fasta(write(tmp_path, "\n\n", "empty.fa")))
    with pytest.raises(FastaError, match="before the first '>'"):
        list(read_fasta(write(tmp_path, "ACDEF\n>a\nAC\n", "nohdr.fa")))


def test_truncated_gzip(tmp_path):
    p = tmp_path / "t.fa.gz"
    data = gzip.compress((">a\n" + "ACDEFGHIK" * 5000 + "\n").encode())
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastaError, match="truncated"):
        list(read_fasta(p))


def test_real_data(shared_data):
    recs = list(read_fasta(shared_data / "esm_examples" / "some_proteins.fasta"))
    assert len(recs) == 15
    n = sum(1 for _ in read_fasta(shared_data / "scope_astral40" / "astral.fa", unknown_as_x=True))
    assert n == 14323


def test_sanitize_id():
    assert sanitize_id("sp|P62593|BLAT_ECOLX") == "sp_P62593_BLAT_ECOLX"
    assert sanitize_id("../../etc/passwd") == "etc_passwd"
