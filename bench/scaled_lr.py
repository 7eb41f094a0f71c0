"""The lr a benchmark trains at: the paper's, scaled to the benchmark's ``--batch``.

One owner for the rule, shared by every benchmark that trains the same few synthetic or
pre-loaded batches over and over (``bench_service``, ``bench_shard_check``, ``bench_model``): at
the paper's fixed 0.01 a small ``--batch`` diverged within a dozen steps and the rest of the
run timed arithmetic on nan weights (or, where a loss is checked, ended the run), and a large one
timed a run the service would never make.
"""
from __future__ import annotations

from pipeline.config import LoaderConfig
from service.config import OptimSettings

PAPER_LR, PAPER_BATCH = OptimSettings.lr, LoaderConfig.batch_size  # 0.01 at 128


def bench_lr(batch: int) -> float:
    """The paper's lr scaled linearly to ``batch``, as the service scales it to N ranks' global batch
    (``optim.lr_scaling linear``).  The same four random batches again and again at the paper's 0.01
    diverged at batch 2 by the 12th step (nan), and the service loop's divergence check ended the
    benchmark in a traceback; at ``0.01 * batch / 128`` batches 1 and 2 train 150 steps without."""
    return PAPER_LR * batch / PAPER_BATCH
