"""Non-padding fraction of fine-tuning batches (host only, no model): length-sorted windows (what
``esmjax finetune`` does) against random batches, both padded to a length bucket.

    python tools/finetune_padding.py runs/scope.csv sequence_classification 256 32
"""

import sys

import numpy as np

from esmjax.config import FinetuneConfig, FinetuneDataConfig
from esmjax.inference.engine import bucket_for, length_buckets
from esmjax.io import labeled
from esmjax.train.finetune_data import Encoded, Targets, train_batch


def main(path: str, task: str, max_length: int, batch: int, steps: int = 200) -> None:
    cfg = FinetuneConfig(
        backbone="-", task=task, data=FinetuneDataConfig(csv=path, max_length=max_length)
    )
    splits, _ = labeled.load(cfg.data, task)
    enc = Encoded(splits["train"], Targets(cfg, splits["train"]), False, None)
    sorted_fr = [(train_batch(enc, s, batch, 0)["tokens"] != 1).mean() for s in range(steps)]
    rng = np.random.default_rng(0)
    random_fr = []
    for _ in range(steps):
        lengths = [enc.lengths[i] for i in rng.choice(len(enc), batch, replace=False)]
        random_fr.append(sum(lengths) / (batch * bucket_for(max(lengths), length_buckets(2048))))
    print(
        f"{path}: non-pad fraction {np.mean(sorted_fr):.3f} (length-sorted windows), "
        f"{np.mean(random_fr):.3f} (random batches), {steps} batches of {batch}"
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]))
