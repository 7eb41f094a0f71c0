"""The training loop: epochs of steps, evaluation, checkpoints, and stopping on request.

Per step the loop only takes host timestamps and updates counters (no device sync); every
``log_every`` steps it synchronises every device the model uses (both GPUs for the towers
layout) once, reads the loss and writes a log line.  After each step it checks the stop flag
(a signal) and whether a checkpoint is due (every N steps and/or every T seconds); each epoch
ends with an evaluation, the plateau schedule and a checkpoint.  A loss or weight that is not
finite (read at those same log intervals and before checkpoints) stops the run: ``service.divergence``.

Resume is exact: the checkpoint holds the loader's position, so a restarted run continues the
interrupted epoch with the batches it had not yet trained on, with the same dropout draws.
What a checkpoint holds, when it is due and how a run resumes: ``service.checkpointer``.

Several ranks: the stop and checkpoint decisions, and a failed checkpoint write, are agreed by
every rank (a step late, ``service.dist.Agreement``): every rank stops or checkpoints at one step.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from model import EvalResult, evaluate
from service import divergence
from service.build import Parts
from service.checkpointer import CheckpointManager, LrRule, Resumed, Velocities
from service.data_errors import diagnose, guarded
from service.dist import Agreement, Ranks
from service.errors import ServiceError
from service.metric_logger import StepTimer
from service.metrics import ServiceMetrics
from service.rng import RngState
from service.runlog import RunLog, memory
from service.signals import StopFlag
from service.state import Progress
from service.status import StatusBoard
from shards.manifest import Manifest


class Interrupted(Exception):
    """A stop was requested during evaluation."""


class Trainer:
    """Runs one process's share of a training run (see the module docstring)."""

    def __init__(self, parts: Parts, ranks: Ranks, manifest: Manifest, identity: dict[str, Any], run_id: str,
                 metrics: ServiceMetrics, board: StatusBoard, log: RunLog, stop: StopFlag) -> None:
        self.parts, self.cfg, self.ranks, self.manifest = parts, parts.cfg, ranks, manifest
        self.identity = identity
        self.metrics, self.board, self.log, self.stop = metrics, board, log, stop
        self.progress = Progress()
        self.chance = 1 - 1 / parts.num_classes
        shared = {"model": parts.model, "velocity": Velocities(parts.model, parts.optimizer),
                  "schedule": parts.schedule, "lr_scale": LrRule(parts.optimizer, parts.lr_scale),
                  "scaler": parts.scaler, "progress": self.progress}
        per_rank = {"loaders": parts.train, "rng": RngState(parts.devices, self.cfg.seed, ranks.rank, log.warn)}
        self.checkpoints = CheckpointManager(self.cfg, ranks, log, identity, run_id, shared, per_rank, self._written)
        self.agreement = Agreement(ranks)
        self._ids = f"ids{ranks.suffix()}.jsonl" if self.cfg.debug.ids else None  # RunLog.append

    @property
    def run_id(self) -> str:
        return self.checkpoints.run_id  # a resumed run keeps its id

    def resume(self) -> Resumed | None:
        """Continue from the newest readable checkpoint in the run directory, if there is one."""
        resumed = self.checkpoints.resume()
        if resumed is not None:
            self.metrics.checkpointed(resumed.time, resumed.path)
            self.board.update(last_checkpoint={"path": str(resumed.path), "time": resumed.time})
            if self.progress.history:
                self.report_evaluation(self.progress.history[-1])
        return resumed

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> bool:
        """Train and evaluate until ``cfg.epochs`` are done (True; also when a stop comes with the last
        epoch's checkpoint) or a stop was requested (False)."""
        for _ in range(self.progress.evaluated, self.cfg.epochs):
            if self.progress.epoch == self.progress.evaluated and not self.train_epoch():
                return False
            if not self.evaluate_epoch():
                return self.progress.evaluated == self.cfg.epochs
        self.checkpoints.wait()
        return True

    def position(self) -> str:
        """Where the run stands, for people: "epoch 3 step 120/5005", "end of epoch 2"..."""
        p, steps = self.progress, len(self.parts.train)
        if p.epoch > p.evaluated:
            return f"epoch {p.epoch} trained, its evaluation pending"
        if p.step_in_epoch in (0, steps):
            return f"end of epoch {p.epoch}" if p.epoch else "start of epoch 1"
        return f"epoch {p.epoch + 1} step {p.step_in_epoch}/{steps}"

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when stopped (after a checkpoint).

        A stop or checkpoint due at the epoch's last step waits until the loader has ended the
        epoch, so a checkpoint is either mid-epoch or at a clean epoch boundary."""
        p, parts = self.progress, self.parts
        steps = len(parts.train)
        if p.step_in_epoch in (0, steps):
            p.start_epoch()
        if self._stop_requested():  # before the loader hands out (and moves past) another batch
            self._checkpoint("stop")
            return False
        epoch = p.epoch + 1
        self.metrics.epoch.set(epoch)
        self.board.update(epoch=epoch, steps_per_epoch=steps)
        timer, loss_sum, last = StepTimer(), torch.zeros((), device=parts.model.output_device), time.perf_counter()
        batches = guarded(parts.train, lambda exc: self._data_error(exc, "train"))
        shown = None  # the loss the log shows: the last step's, but an empty batch's 0 is no loss
        for batch in timer.iterate(batches, lambda b: b[1].shape[0]):
            loss, images = self._step(batch), int(batch[1].shape[0])
            if images:
                loss_sum += loss
            shown = loss if images or shown is None else shown
            now = time.perf_counter()
            self._count_step(images, now - last, timer.last_wait)
            if p.step_in_epoch % self.cfg.log_every == 0 or p.step_in_epoch == steps:
                self._log_window(timer, shown, epoch, steps)
            if p.step_in_epoch < steps:
                stop, due = self._agree()
                if stop or due:
                    self._checkpoint("stop" if stop else "interval", loss_sum)
                    if stop:
                        return False
            last = time.perf_counter()  # a checkpoint's blocking time is not a step's
        p.epoch += 1
        p.epoch_loss_sum += loss_sum.item()
        self._check_finite(divergence.state_problem(p.epoch_loss_sum, parts.model))  # before its evaluation
        if self._stop_requested():
            self._checkpoint("stop")
            return False
        return True

    def _step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        parts = self.parts
        images, labels = batch[0], batch[1]
        loss = parts.step(images, labels)
        if self._ids is not None:
            self.log.append(self._ids, {"epoch": self.progress.epoch + 1, "step": self.progress.step + 1,
                                        "ids": batch[2].tolist()})
        return loss

    def _count_step(self, images: int, seconds: float, waited: float) -> None:
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        p.epoch_images += images
        p.epoch_empty_steps += images == 0
        p.epoch_seconds += seconds
        p.epoch_data_seconds += waited
        self.metrics.step(images, seconds, waited)
        self.board.beat("training")
        if self.parts.shard_check is not None:  # a shard the background check found corrupt stops the run
            self.parts.shard_check.poll(p.step)

    def _log_window(self, timer: StepTimer, loss: torch.Tensor, epoch: int, steps: int) -> None:
        """The log interval: one sync of every device, then metrics, status and log lines."""
        w = timer.window(self._sync)
        p, value, lr = self.progress, loss.item(), self.parts.schedule.lrs[0]
        self.metrics.loss.set(value)
        self.metrics.lr.set(lr)
        self.metrics.gpu_memory(self.parts.devices)
        fields = dict(epoch=epoch, step=p.step, step_in_epoch=p.step_in_epoch, steps_per_epoch=steps,
                      loss=value, lr=lr, images_per_s=w.images_per_s, data_wait_share=w.data_share)
        self.board.update(**fields)
        per_rank = " per rank" if self.ranks.distributed else ""
        self.log.say(f"epoch {epoch} step {p.step_in_epoch}/{steps} loss {value:.4f} "
                     f"{w.images_per_s:.1f} img/s{per_rank} data-wait {w.data_share:.0%}")
        self.log.event("train", **fields, window_steps=w.steps, window_seconds=round(w.seconds, 4))
        self._check_finite(divergence.loss_problem(value))

    def _check_finite(self, problem: str | None) -> None:
        """Stop with exit 6 when ``problem`` (or another rank's) says the run diverged
        (``service.divergence``); every rank calls this at the same points."""
        problem = divergence.agreed(self.ranks, problem)
        if problem is not None:
            self.checkpoints.writer.join()  # the newest good checkpoint durable before it is named
            # Rank 0's line on every rank: it wrote that checkpoint; another rank listing the directory
            # could do so before rank 0's write was in place ("no checkpoint had been written").
            refusal = divergence.refusal(problem, self.progress.step, self.position(), self.cfg.optim.lr, self.cfg.out)
            raise self.ranks.gather(refusal)[0]

    def _sync(self) -> None:
        for d in self.parts.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop, agreed now (all ranks stop at the same step)."""
        return self._stopping(self.agreement.now(self.stop.requested)[0])

    def _agree(self) -> tuple[bool, bool]:
        """(stop, checkpoint due) after a step, the same on every rank.  A checkpoint by step count
        needs no agreement; a stop, a checkpoint by time or a failed checkpoint write (exit 4 on
        every rank) is the answer to the question asked after the previous step
        (``Agreement.lagged``), unless a checkpoint came since."""
        step = self.progress.step
        (stop, by_time, failed), asked = self.agreement.lagged(step, self.stop.requested,
                                                               self.checkpoints.due_by_time(),
                                                               self.checkpoints.writer.failure is not None)
        if failed:
            self.checkpoints.wait()  # raises it everywhere
        by_time = by_time and asked is not None and self.checkpoints.saved_step < asked
        return self._stopping(stop), self.checkpoints.due_by_steps(step) or by_time

    def _stopping(self, stop: bool) -> bool:
        if stop:
            self.stop.request("a stop on another rank")  # keeps this rank's own signal name if it had one
        return stop

    def _data_error(self, exc: BaseException, split: str):
        self.metrics.samples_failed.inc()
        return diagnose(exc, self.manifest, split)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate_epoch(self) -> bool:
        """Evaluate the epoch just trained, step the schedule, checkpoint; False when stopped."""
        p, parts = self.progress, self.parts
        self.board.update(phase="evaluating")
        start = time.perf_counter()
        try:
            mine = evaluate(parts.evaluator, self._eval_batches(), autocast_dtype=parts.autocast,
                            channels_last=self.cfg.model.channels_last)
            result = EvalResult.combine(self.ranks.gather(mine))  # every rank's share of the split
            seconds = time.perf_counter() - start  # the gather waited for every rank's results
        except Interrupted:
            self._checkpoint("stop")
            return False
        lr = parts.schedule.lrs[0]
        dropped = parts.schedule.step(result.top1_error)
        record = p.epoch_record(lr, result, seconds, self.cfg.eval_views)
        p.history.append(record)
        p.evaluated = p.epoch
        p.start_epoch()  # now: counters kept across a change of ranks count another number of steps
        self.report_evaluation(record)
        self.log.say(f"epoch {p.epoch}/{self.cfg.epochs}: train loss {record['train_loss']:.4f}, val top-1 error "
                     f"{result.top1_error:.1%} (chance {self.chance:.1%}), top-5 error {result.top5_error:.1%} "
                     f"({self.cfg.eval_views}-view, {seconds:.1f} s), {record['images_per_s']:.1f} img/s"
                     + (f"; lr -> {parts.schedule.lrs[0]:g}" if dropped else ""))
        if self.ranks.is_main:
            self.log.history(p.history, self.chance)
        self._checkpoint("epoch")
        # Memory after the epoch's checkpoint copy: the soak test compares it across epochs.
        self.log.event("eval", **record, val_images=result.images, lr_dropped=dropped, **memory())
        return not self._stop_requested()

    def report_evaluation(self, record: dict[str, Any]) -> None:
        """The evaluation's numbers, and the lr it left (a drop shows now, not at the next log line)."""
        self.metrics.evaluation(record["top1_error"], record["top5_error"], record["val_loss"],
                                record.get("eval_seconds", math.nan))  # a history from before it was timed
        self.metrics.lr.set(lr := self.parts.schedule.lrs[0])
        self.board.update(lr=lr, last_evaluation={k: record[k] for k in ("epoch", "top1_error", "top5_error", "val_loss")})

    def _eval_batches(self):
        for images, labels, *_ in guarded(self.parts.val, lambda exc: self._data_error(exc, "val")):
            if self._stop_requested():
                raise Interrupted
            self.board.beat("evaluating")
            yield images, labels

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint(self, reason: str, loss_sum: torch.Tensor | None = None) -> None:
        """Checkpoint now (see ``CheckpointManager.save``), timed: how long the loop stood still."""
        start = time.perf_counter()
        self.board.beat("checkpointing")
        if reason == "stop":
            self.agreement.settle(3)  # nothing left in flight on the way out
        p = self.progress
        if loss_sum is not None:  # fold the device-side loss sum into the saved progress
            p.epoch_loss_sum += loss_sum.item()
            loss_sum.zero_()
        self._check_finite(divergence.state_problem(p.epoch_loss_sum, self.parts.model))  # never saved diverged
        self.checkpoints.save(reason)
        blocked = time.perf_counter() - start
        self.metrics.checkpoint_seconds.observe(blocked)
        self.log.event("checkpoint_started", reason=reason, step=p.step, blocked_seconds=round(blocked, 4))
        self.board.beat("stopping" if reason == "stop" else "training")

    def _written(self, path: Path, seconds: float) -> None:
        """In the writer thread, once ``path`` is durable."""
        now = time.time()
        self.metrics.checkpointed(now, path)
        self.board.update(last_checkpoint={"path": str(path), "time": now})
        self.log.say(f"checkpoint {path} ({seconds:.2f} s to write)")
        self.log.event("checkpoint", path=str(path), write_seconds=round(seconds, 4))

    def close(self) -> None:
        """Let a write in flight finish (its error, if any, is secondary to the one being raised)."""
        try:
            self.checkpoints.writer.wait()
        except ServiceError:
            pass
