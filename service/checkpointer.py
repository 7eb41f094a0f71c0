"""The one owner of checkpoint state: what a checkpoint holds, when one is written, how it is
staged to host memory, which file a restart resumes from, and in which order it is restored.

Every stateful part exposes ``state_dict()`` / ``load_state_dict()`` (torchtitan's pattern): the
model, the momentum (``Velocities``), the plateau schedule, the lr rule (``LrRule``), the float16
gradient scaler, the progress counters (``service.state.Progress``), and per rank the training
loader's position and the random generators (``service.rng``).  The manager holds them and
nothing else writes into the ``Trainer``.  Files, format and version: ``service.checkpoint``.

Several ranks: rank 0 alone chooses the file (and renames unreadable ones), then broadcasts its
path and step; every rank loads that file and reports the step it restored, and the run starts
only when they all agree.  (When every rank chose for itself, the ranks that lost the race to
rename a damaged file died of a FileNotFoundError, and on shared storage ranks could resume
from different files: DDP's broadcast at construction had happened before the restore.)  Its
choice trusts no file name over the file (``service.checkpoint.newest_valid``): the stored step
must be the name's, the run the directory's (the run id of its log's last start), and a copy of
the directory trains under an id of its own (``service.run_ids``), which rank 0 gives every rank.

Same ranks, same graph: the exact position (every rank's loader state and RNG state).  Another
number of ranks (or a checkpoint from the other decode graph): the weights, velocities,
schedule and counters carry over, the data is split anew and an interrupted epoch restarts
from its first step (said in the log; an epoch stopped at its end, its evaluation pending, is
not trained again and keeps its counters), and the lrs move to this run's rule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from common.config import to_dict
from model import load_velocity_state, velocity_state
from service import checkpoint as ckpt
from service import run_ids
from service.checkpoint_writer import CheckpointWriter, write_error
from service.config import TrainConfig
from service.dist import Ranks
from service.errors import EXIT_CONFIG, ServiceError
from service.runlog import RunLog
from service.staging import HostBuffers
from service.state import Progress, check_identity

SHARED_ORDER = ("model", "velocity", "schedule", "lr_scale", "scaler", "progress")  # restored in this order


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Velocities:
    """The optimizer's momentum keyed like the model's state dict, so it moves between layouts."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return velocity_state(self.model, self.optimizer, copy=False)  # staged into host buffers anyway

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_velocity_state(self.model, self.optimizer, state)


class LrRule:
    """The lr rule's factor at this run's global batch: a checkpoint's lrs were for its own global
    batch, and are moved to this run's rule on restore (after the schedule put them back)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scale: float) -> None:
        self.optimizer, self.scale = optimizer, scale

    def state_dict(self) -> float:
        return self.scale

    def load_state_dict(self, saved_scale: float) -> None:
        if saved_scale != self.scale:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.scale / saved_scale


@dataclass(frozen=True)
class Resumed:
    """What a restart continued from."""

    path: Path
    step: int
    run_id: str  # the id the run trains under: the checkpoint's, or a copy's own (``service.run_ids``)
    time: float  # when the checkpoint was taken (unix seconds)
    copied_from: str | None = None  # a copied run directory: the run whose checkpoint it resumed
    original: str | None = None  # and the directory that checkpoint was written in


class CheckpointManager:
    """Checkpoints of one run; every rank has one (rank 0 writes, every rank hands in its part)."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, log: RunLog, identity: dict[str, Any], run_id: str,
                 shared: dict[str, Stateful | None], per_rank: dict[str, Stateful], on_written) -> None:
        self.cfg, self.ranks, self.log, self.identity, self.run_id = cfg, ranks, log, identity, run_id
        self.shared, self.per_rank = shared, per_rank
        self.run_dir = run_ids.run_dir(cfg.out)  # in every checkpoint: a copy of the directory is told by it
        self.progress: Progress = shared["progress"]
        c = cfg.checkpoint
        self.writer = CheckpointWriter(cfg.out, c.keep, c.background, on_written)
        self.buffers = HostBuffers()
        self.saved_at: tuple[int, int] | None = None  # (step, evaluated) of the last checkpoint
        self.saved_step = -1  # the step of the last checkpoint, the same on every rank
        self._last_time = time.monotonic()

    # -- when --------------------------------------------------------------------------------

    def due_by_steps(self, step: int) -> bool:
        """The same answer on every rank: no agreement needed."""
        return self.cfg.checkpoint.every_steps > 0 and step % self.cfg.checkpoint.every_steps == 0

    def due_by_time(self) -> bool:
        """This rank's clock: the loop agrees on it with the other ranks."""
        seconds = self.cfg.checkpoint.every_seconds
        return seconds > 0 and time.monotonic() - self._last_time >= seconds

    # -- saving -------------------------------------------------------------------------------

    def save(self, reason: str) -> None:
        """Checkpoint now (every rank calls it; rank 0 writes).  Blocks for the copy to host
        memory only, or until the file is durable when stopping."""
        p = self.progress
        self.writer.join()  # rank 0: its buffers are about to be refilled
        gathered = self.ranks.gather(({k: s.state_dict() for k, s in self.per_rank.items()}, self.writer.failure))
        self._fail_together([failure for _, failure in gathered])
        if self.ranks.is_main and self.saved_at != (p.step, p.evaluated):
            self.writer.save(self._payload(reason, [state for state, _ in gathered]), p.step)
            self.saved_at = (p.step, p.evaluated)
        if reason == "stop":
            self.wait()  # every rank exits once the file is durable
        self.saved_step = p.step
        self._last_time = time.monotonic()

    def wait(self) -> None:
        """Every rank: the write in flight durable, or its failure raised on every rank."""
        self.writer.join()
        self._fail_together(self.ranks.gather(self.writer.failure))

    def _fail_together(self, failures: list[str | None]) -> None:
        """Exit 4 on every rank when a rank's write failed (rank 0's: it alone writes).  Raised on
        rank 0 alone, the others ran on into their next collective and died of its departure
        (a gloo traceback); every rank calls this at the same point with every rank's failure."""
        for rank, failure in enumerate(failures):
            if failure is not None:
                self.writer.check()  # this rank's own
                raise write_error(self.cfg.out, failure, rank)

    def _payload(self, reason: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "run_id": self.run_id, "run_dir": self.run_dir,
                   "reason": reason, "time": time.time(), "config": to_dict(self.cfg), "identity": self.identity}
        for key in SHARED_ORDER:
            part = self.shared[key]
            payload[key] = None if part is None else self.buffers.stage(key, part.state_dict())
        for key in self.per_rank:
            payload[key] = [r[key] for r in per_rank]
        self.buffers.ready()
        return payload

    # -- resuming ------------------------------------------------------------------------------

    def resume(self) -> Resumed | None:
        """Restore the newest readable checkpoint on every rank (rank 0 chooses); None for a new run."""
        choice, payload = self._choose() if self.ranks.is_main else (None, None)
        # A new run's id too: rank 0's (each rank's own clock could be a second apart).
        choice, self.run_id = self.ranks.broadcast((choice, self.run_id))
        if isinstance(choice, tuple):  # rank 0 refused: every rank stops with its message
            raise ServiceError(*choice)
        if choice is None:
            return None
        # The file rank 0 chose, in this rank's own --out: a node may mount the run directory elsewhere.
        path, step = self.cfg.out / Path(choice["path"]).name, choice["step"]
        error = None
        try:
            payload = payload if payload is not None else self._load(path, choice)
            self._restore(path, payload)
        except ServiceError as exc:
            error = (exc.code, str(exc))
        self._verify(path, step, self.ranks.gather((self.progress.step, error)))
        self.saved_at = (self.progress.step, self.progress.evaluated)
        self.saved_step = self.progress.step
        self.run_id = choice["train_as"]
        return Resumed(path, step, self.run_id, payload["time"], choice["copied_from"], choice["original"])

    def _choose(self) -> tuple[dict | tuple | None, dict | None]:
        """Rank 0: ({path, step} | None | (code, message) of a refusal, the loaded payload)."""
        try:
            for stale in ckpt.remove_stale_temps(self.cfg.out):
                self.log.warn(f"removed {stale}: a checkpoint write that never finished (the process was killed)")
            last_start = self.log.last_start()
            found = ckpt.newest_valid(self.cfg.out, self.log.warn, last_start)
        except ServiceError as exc:
            if not self.ranks.distributed:
                raise
            return (exc.code, str(exc)), None
        if found is None:
            return None, None
        payload = found[1]
        run = run_ids.continued(self.cfg.out, payload, last_start)  # not None: newest_valid refuses that
        return {"path": str(found[0]), "step": int(payload["progress"]["step"]), "run_id": payload["run_id"],
                "time": payload["time"], "train_as": run.run_id, "copied_from": run.copied_from,
                "original": run.original}, payload

    def _load(self, path: Path, choice: dict[str, Any]) -> dict[str, Any]:
        """Another rank reads the file rank 0 chose, and checks it is that file: a node's own copy
        of the run directory may hold another run's file of that name and step (same settings,
        other ranks or stops), whose restore left the replicas apart and the job hung."""
        shared = "every rank must see the same run directory (shared storage)"
        try:
            payload = ckpt.load(path)
        except (ckpt.Unreadable, ckpt.OtherVersion, OSError) as exc:
            raise ServiceError(EXIT_CONFIG, f"cannot read {path}, the checkpoint rank 0 resumes from ({exc}): "
                               f"{shared}") from None
        if (payload["run_id"], payload["time"]) != (choice["run_id"], choice["time"]):
            raise ServiceError(EXIT_CONFIG, f"{path} is not the checkpoint rank 0 resumes from: run {payload['run_id']} "
                               f"saved it {_when(payload['time'])}, rank 0's is run {choice['run_id']}'s of "
                               f"{_when(choice['time'])}; {shared}")
        return payload

    def _restore(self, path: Path, payload: dict[str, Any]) -> None:
        """Every part from ``payload``, in ``SHARED_ORDER``, then this rank's position."""
        check_identity(path, payload["identity"], self.identity)  # before anything is touched
        for key in SHARED_ORDER:
            part = self.shared[key]
            if part is not None and payload.get(key) is not None:
                part.load_state_dict(payload[key])
        self._check_views(path, payload)
        p = self.progress
        if not self._restore_position(path, payload) and p.epoch == p.evaluated:
            p.start_epoch()  # the interrupted epoch's data is taken again from its start
        # A trained epoch whose evaluation is pending keeps its counters: its record's train loss
        # and images/s come from them, and it is not trained again.

    def _check_views(self, path: Path, payload: dict[str, Any]) -> None:
        """eval_views may change at a restart, but the plateau schedule compares each validation
        error with the best so far: 1-view errors against a 10-view best dropped the lr early (and
        10-view ones against a 1-view best counted as progress).  The wait starts over, said once
        by a restart that evaluates (one with more ``--epochs`` later still sees the views)."""
        saved = (payload.get("config") or {}).get("eval_views")
        if saved is None or saved == self.cfg.eval_views or self.shared["schedule"] is None:
            return
        self.shared["schedule"].forget_best()
        if self.progress.evaluated >= self.cfg.epochs:
            return
        line = (f"{path} was evaluated with eval_views {saved}, this run with {self.cfg.eval_views}: the lr "
                "schedule waits for a new best validation error afresh (errors of other views are not comparable; "
                "history.json gives each epoch's eval_views)")
        self.log.event("eval_views_changed", text=line)
        if self.ranks.is_main:
            self.log.warn(line)

    def _restore_position(self, path: Path, payload: dict[str, Any]) -> bool:
        """This rank's loader position and RNG state; False (with a warning) when they cannot
        apply: written by another number of ranks, or by another decode graph."""
        saved, rank, ranks = payload["loaders"], self.ranks.rank, self.ranks.world_size
        if len(saved) != ranks:
            self._say_once(f"{path} was written by {len(saved)} rank(s), this run has {ranks}: the data is "
                           f"{self._resplit()}")
            return False
        try:
            self.per_rank["loaders"].load_state_dict(saved[rank])
        except ValueError as exc:
            self.log.warn(f"{path}: the training loader's saved position does not fit this run ({exc}); "
                          f"the data is {self._resplit()}")
            return False
        self.per_rank["rng"].load_state_dict(payload["rng"][rank])
        return True

    def _say_once(self, line: str) -> None:
        """A warning every rank reaches alike: each records it in its own JSON log (``resplit``),
        rank 0 alone says it on the console, which the ranks share (as ``service.shard_check``)."""
        self.log.event("resplit", text=line)
        if self.ranks.is_main:
            self.log.warn(line)

    def _resplit(self) -> str:
        """What a new split of the data changes: with an epoch's evaluation pending (a stop at its
        end), nothing trained is redone, only the epochs after it are split anew."""
        p = self.progress
        if p.epoch > p.evaluated:
            return (f"split anew from epoch {p.epoch + 1} on; epoch {p.epoch}, trained, is evaluated with its "
                    "own counters")
        return "split anew, and an interrupted epoch restarts from its first step"

    def _verify(self, path: Path, step: int, outcomes: list[tuple[int, tuple | None]]) -> None:
        """Every rank restored ``step`` from ``path``, or every rank stops with the first failure."""
        for rank, (_, error) in enumerate(outcomes):
            if error is not None:
                raise ServiceError(error[0], error[1] if rank == self.ranks.rank else f"rank {rank}: {error[1]}")
        restored = [s for s, _ in outcomes]
        if any(s != step for s in restored):
            raise ServiceError(EXIT_CONFIG, f"the ranks restored different steps from {path} (step {step} "
                               f"chosen, by rank: {restored}); refusing to train replicas that disagree")


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
