"""The Apache Beam back-end of ``esmjax data build``, for UniRef-scale inputs on a distributed
runner.

Steps 1-3 of ``esmjax.data.builder`` are one pipeline that TFDS runs
(``DownloadConfig(beam_runner=...)``) and that writes the same ArrayRecord splits as the local
back-end: each FASTA file is parsed and validated by one worker (``read_fasta``; split a huge FASTA
into several files to read them in parallel), the membership TSV likewise, and the two are joined
by member id with ``CoGroupByKey``, where duplicate ids, records in no cluster, members listed twice
and TSV rows naming unknown members are detected. Without ``skip_invalid`` the first such problem
fails the pipeline with a message naming the file and line; with it, the problems are counted, and
the counts are written next to the dataset and merged into the build summary.

Requires the ``beam`` extra (``pip install esmjax[beam]``). Tested with the DirectRunner
(tests/test_data_build.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from esmjax.data import source
from esmjax.data.builder import (
    BuildError,
    BuildPlan,
    BuildStats,
    EsmjaxProteinClusters,
    example,
    parse_tsv_line,
)
from esmjax.io.fasta import FastaStats, open_text, read_fasta

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # pragma: no cover - depends on the optional extra
    beam = None

SKIPPED = "skipped"
_COUNTS_FILE = ".beam_skipped"
_READ, _RESIDUES, _AS_X, _ROWS, _FASTA = (
    "(records)",
    "(residues)",
    "(read as X)",
    "(tsv rows)",
    "fasta:",
)


def _require_beam() -> None:
    if beam is None:
        raise BuildError("--beam-runner needs Apache Beam: pip install 'esmjax[beam]'")


def _read_fasta_file(
    item: tuple[int, str], unknown_as_x: bool, skip_invalid: bool
) -> Iterator[Any]:
    """(member id, (file, line, sequence)) per record; skip reasons go to the ``skipped`` output."""
    file, path = item
    stats = FastaStats()
    for rec in read_fasta(path, unknown_as_x=unknown_as_x, skip_invalid=skip_invalid, stats=stats):
        yield rec.id, (file, rec.line, rec.sequence)
    counts = {_FASTA + r: n for r, n in stats.reasons.items()}
    counts.update({_READ: stats.records, _RESIDUES: stats.residues, _AS_X: stats.mapped_to_x})
    for reason, n in counts.items():
        yield beam.pvalue.TaggedOutput(SKIPPED, (reason, n))


def _read_tsv(path: str, skip_invalid: bool) -> Iterator[Any]:
    """(member id, (cluster, line)) per membership row."""
    p = Path(path)
    bad = good = 0
    with open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            try:
                parsed = parse_tsv_line(p, lineno, line)
            except BuildError:
                if not skip_invalid:
                    raise
                bad += 1
                continue
            if parsed is not None:
                good += 1
                yield parsed[1], (parsed[0], lineno)
    yield beam.pvalue.TaggedOutput(SKIPPED, (_ROWS, good))
    if bad:
        yield beam.pvalue.TaggedOutput(SKIPPED, ("malformed membership rows", bad))


def _join(
    item: tuple[str, dict[str, list]],
    fastas: Sequence[str],
    tsv: str | None,
    val_fraction: float,
    skip: bool,
) -> Iterator[Any]:
    """Checks one member id across FASTA records and TSV rows; emits (split, (key, example))."""
    member, groups = item
    recs = sorted(groups.get("rec", []))
    rows = sorted(groups.get("mem", []), key=lambda r: r[1])

    def problem(reason: str, message: str) -> Any:
        if not skip:
            raise BuildError(message)
        return beam.pvalue.TaggedOutput(SKIPPED, (reason, 1))

    if tsv is not None and not recs:
        cluster, line = rows[0]
        yield problem(
            "membership rows naming unknown members",
            f"{tsv}:{line}: member {member!r} of cluster {cluster!r} is not a record of any FASTA "
            "input",
        )
        return
    for file, line, _ in recs[1:]:
        f0, l0, _ = recs[0]
        yield problem(
            "duplicate ids",
            f"{fastas[file]}:{line}: duplicate record id {member!r} (first at {fastas[f0]}:{l0})",
        )
    for cluster, line in rows[1:]:
        yield problem(
            "membership rows repeating a member",
            f"{tsv}:{line}: member {member!r} of cluster {cluster!r} is already listed in cluster "
            f"{rows[0][0]!r} (line {rows[0][1]})",
        )
    file, line, sequence = recs[0]
    if tsv is not None:
        cluster = rows[0][0] if rows else None
        if cluster is None:
            yield problem(
                "records in no cluster",
                f"{fastas[file]}:{line}: record {member!r} is in no cluster of the membership TSV",
            )
            return
    else:
        cluster = member
    split = "validation" if source.held_out(cluster, val_fraction) else "train"
    yield split, example(member, cluster, sequence)


class BeamBuilder(EsmjaxProteinClusters, skip_registration=True):
    """The same dataset, generated by a Beam pipeline."""

    name = source.TFDS_NAME

    def _split_generators(self, dl_manager: Any, pipeline: Any) -> dict[str, Any]:
        plan = self._plan
        records = (
            pipeline
            | "FastaFiles" >> beam.Create(list(enumerate(plan.fastas)))
            | "ReadFasta"
            >> beam.FlatMap(_read_fasta_file, plan.unknown_as_x, plan.skip_invalid).with_outputs(
                SKIPPED, main="rec"
            )
        )
        groups = {"rec": records.rec}
        skipped = [records[SKIPPED]]
        if plan.clusters:
            rows = (
                pipeline
                | "TsvFile" >> beam.Create([plan.clusters])
                | "ReadTsv"
                >> beam.FlatMap(_read_tsv, plan.skip_invalid).with_outputs(SKIPPED, main="mem")
            )
            groups["mem"] = rows.mem
            skipped.append(rows[SKIPPED])
        joined = (
            groups
            | "ByMember" >> beam.CoGroupByKey()
            | "Check"
            >> beam.FlatMap(
                _join, plan.fastas, plan.clusters, plan.val_fraction, plan.skip_invalid
            ).with_outputs(SKIPPED, main="ok")
        )
        skipped.append(joined[SKIPPED])
        _ = (
            tuple(skipped)
            | "AllSkipped" >> beam.Flatten()
            | "SumSkipped" >> beam.CombinePerKey(sum)
            | "AsJson" >> beam.Map(json.dumps)
            | "WriteSkipped"
            >> beam.io.WriteToText(str(Path(plan.work_dir) / _COUNTS_FILE), shard_name_template="")
        )
        return {
            s: joined.ok
            | f"Only{s}" >> beam.Filter(lambda kv, s=s: kv[0] == s)
            | f"Drop{s}" >> beam.Values()
            for s in plan.splits
        }

    def _generate_examples(self, split: str) -> Any:
        """Unused (abstract in TFDS): ``_split_generators`` returns the pipeline's collections."""
        raise NotImplementedError

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """TFDS's, with its failure on an empty split turned into a build error."""
        try:
            super().download_and_prepare(*args, **kwargs)
        except ValueError as e:
            if "This should be >0" not in str(e) or isinstance(e, BuildError):
                raise
            split = "validation" if "split validation" in str(e) else "train"
            raise BuildError(
                f"the Beam build produced no {split} records (with few clusters a small "
                "--val-fraction may hold out none: raise it, or use 0 for no validation split)"
            ) from None


class BeamBackend:
    """``esmjax.data.builder.Backend`` that validates and generates in one Beam pipeline on
    ``runner`` (``DirectRunner``, ``DataflowRunner``, ...) with extra pipeline ``flags``."""

    builder_class = BeamBuilder

    def __init__(self, runner: str, flags: Sequence[str] = ()):
        self.runner, self.flags = runner, tuple(flags)

    def prepare(self, plan: BuildPlan, stats: BuildStats) -> BuildPlan:
        """Nothing to do beforehand but check that Beam is there; split sizes are known only after
        the pipeline ran."""
        _require_beam()
        return replace(plan, splits=source.SPLITS if plan.val_fraction > 0 else ("train",))

    def download_config(self) -> tfds.download.DownloadConfig:
        return tfds.download.DownloadConfig(
            beam_runner=self.runner, beam_options=PipelineOptions(list(self.flags))
        )

    def finish(self, plan: BuildPlan, stats: BuildStats) -> None:
        """Merges the pipeline's skip counts into ``stats`` and removes their file."""
        p = Path(plan.work_dir) / _COUNTS_FILE
        if not p.exists():
            return
        for line in p.read_text().splitlines():
            reason, n = json.loads(line)
            if reason == _READ:
                stats.fasta.records += n
            elif reason == _RESIDUES:
                stats.fasta.residues += n
            elif reason == _ROWS:
                stats.tsv_rows += n
            elif reason == _AS_X:
                stats.fasta.mapped_to_x += n
            elif reason.startswith(_FASTA):
                stats.fasta.skipped += n
                stats.fasta.reasons[reason[len(_FASTA) :]] = n + stats.fasta.reasons.get(
                    reason[len(_FASTA) :], 0
                )
            else:
                stats.skip(reason, n)
        p.unlink()
