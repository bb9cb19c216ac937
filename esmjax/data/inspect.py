"""``esmjax data inspect``: what a built dataset holds."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import numpy as np

from esmjax.data import source
from esmjax.data.sampling import ClusterSampler

HIST_EDGES = (1, 50, 100, 200, 300, 500, 750, 1023)


def length_histogram(lengths: np.ndarray) -> list[tuple[str, int]]:
    """(label, count) per residue-length bin."""
    counts = np.zeros(len(HIST_EDGES), np.int64)
    for lo in range(0, len(lengths), 1 << 22):  # chunked: the array may be memory-mapped and huge
        bins = np.searchsorted(HIST_EDGES, lengths[lo : lo + (1 << 22)], "right")
        counts += np.bincount(bins, minlength=len(counts) + 1)[1:]
    labels = [f"{a}-{b - 1}" for a, b in zip(HIST_EDGES[:-1], HIST_EDGES[1:])] + [
        f">={HIST_EDGES[-1]}"
    ]
    return list(zip(labels, counts.tolist()))


def inspect_dataset(
    dataset: str,
    split_name: str = "train",
    sample: int = 0,
    seed: int = 0,
    cluster_exponent: float = 1.0,
    out: TextIO = sys.stdout,
) -> None:
    """``esmjax data inspect``: a dataset's provenance, split sizes, length histogram and (with
    ``sample``) ``sample`` cluster-sampled draws as JSON lines, written to ``out``."""
    if not source.is_dataset_dir(dataset):
        raise source.DatasetError(f"{dataset}: not a dataset folder made by `esmjax data build`")
    meta = source.read_meta(dataset)
    print(f"# dataset {dataset}: built from {', '.join(meta['fasta'])}", file=out)
    if meta["clusters"]:
        print(f"# clusters from {meta['clusters']}", file=out)
    print(f"# {meta['stats']['summary']}", file=out)
    for name in source.SPLITS:
        s = meta["splits"][name]
        role = " (held out)" if name == "validation" else ""
        print(
            f"# {name}{role}: {s['records']} records, {s['clusters']} clusters, {s['residues']} "
            "residues",
            file=out,
        )
    split = source.open_split(dataset, split_name)
    lengths = split.lengths
    sizes = np.diff(np.asarray(split.offsets))
    print(
        f"# {split_name} lengths: min {int(lengths.min())}, median {int(np.median(lengths))}, max "
        f"{int(lengths.max())}; cluster sizes: min {int(sizes.min())}, median "
        f"{int(np.median(sizes))}, max {int(sizes.max())}",
        file=out,
    )
    print(f"# {split_name} length histogram (residues):", file=out)
    for label, n in length_histogram(lengths):
        print(f"#   {label:>9}: {n:>10} ({100.0 * n / len(lengths):5.1f}%)", file=out)
    if sample > 0:
        sampler = ClusterSampler(split.offsets, lengths, 1 << 30, seed, cluster_exponent)
        draws = sampler.draws(0, sample)
        for lo in range(0, sample, 4096):
            recs = draws.record[lo : lo + 4096]
            for (rec_id, cluster), r in zip(split.describe(recs), recs.tolist()):
                out.write(
                    json.dumps({"id": rec_id, "cluster": cluster, "length": int(lengths[r])}) + "\n"
                )
