"""The training service: a long-running process that trains AlexNet on the shards, checkpoints,
resumes, stops cleanly on SIGTERM/SIGINT/SIGHUP and exports Prometheus metrics.

``python -m service`` (alias ``python -m service.train``) runs ``service.app.main``.  Modules:

- ``config``: the settings (frozen dataclasses) and their validation;
- ``dist``: rank, world size and local rank (torchrun), the one place that knows about them;
- ``build``: device, model, optimizer, schedule, scaler and loaders from the settings;
- ``loop``: the training loop (steps, log intervals, evaluation, checkpoints, stop);
- ``checkpointer``: the one owner of checkpoint state (what a checkpoint holds, when it is due,
  staging to host memory (``staging``), which file a restart resumes, the restore order);
  ``checkpoint``: the files (format and version, atomic, rotated, verified: ``checkpoint_crc``,
  names not trusted: ``checkpoint_trust``; written in the background: ``checkpoint_writer``); ``state`` / ``rng``:
  the progress counters and run identity (with ``data_stats``, the dataset statistics trained
  with), the random generators;
- ``metrics`` / ``server`` / ``status``: Prometheus metrics in a private registry, the HTTP
  endpoint (/metrics, /healthz, /status) and the shared status it serves;
- ``signals``, ``runlog``, ``data_errors``, ``errors``: stop requests, the run directory's
  logs and plots, loader failures that name the shard, exit codes; ``rank_stops``: a rank stopped
  before the ranks have joined tells the others, through torchrun's store;
- ``launch``: torchrun for ``make train-local NPROC=2``, ending with the ranks' own words and codes.
"""

import os as _os

# This process's parent as the process started, before the imports' seconds: torchrun's agent for
# a rank (``service.signals.follow_launcher`` tells whether it ended before the rank could ask the
# kernel to be told).
PARENT = _os.getppid()
