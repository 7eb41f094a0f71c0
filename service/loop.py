"""The training loop: epochs of steps, evaluation, checkpoints, and stopping on request.

Per step the loop only takes host timestamps and updates counters (no device sync); every
``log_every`` steps it synchronises every device the model uses (both GPUs for the towers
layout) once, reads the loss and writes a log line.  After each step it checks the stop flag
(a signal) and whether a checkpoint is due (every N steps and/or every T seconds); each epoch
ends with an evaluation, the plateau schedule and a checkpoint.

Resume is exact: the checkpoint holds the loader's position, so a restarted run continues the
interrupted epoch with the batches it had not yet trained on, with the same dropout draws.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from model import evaluate
from service import checkpoint as ckpt
from service import resume
from service.build import Parts
from service.data_errors import diagnose, guarded
from service.dist import Ranks
from service.errors import ServiceError
from service.metric_logger import StepTimer
from service.metrics import ServiceMetrics
from service.runlog import RunLog, memory
from service.signals import StopFlag
from service.state import Progress, rng_state
from service.status import StatusBoard
from shards.manifest import Manifest


class Interrupted(Exception):
    """A stop was requested during evaluation."""


class Trainer:
    """Runs one process's share of a training run (see the module docstring)."""

    def __init__(self, parts: Parts, ranks: Ranks, manifest: Manifest, identity: dict[str, Any], run_id: str,
                 metrics: ServiceMetrics, board: StatusBoard, log: RunLog, stop: StopFlag) -> None:
        self.parts, self.cfg, self.ranks, self.manifest = parts, parts.cfg, ranks, manifest
        self.identity, self.run_id = identity, run_id
        self.metrics, self.board, self.log, self.stop = metrics, board, log, stop
        self.progress = Progress()
        self.chance = 1 - 1 / parts.num_classes
        c = self.cfg.checkpoint
        self.writer = ckpt.CheckpointWriter(self.cfg.out, c.keep, c.background, self._written)
        self.buffers = ckpt.HostBuffers()
        self._last_checkpoint_time = time.monotonic()
        self.saved_at: tuple[int, int] | None = None  # (step, evaluated) of the last checkpoint
        self._ids = open(self.cfg.out / f"ids{ranks.suffix()}.jsonl", "a") if self.cfg.debug.ids else None

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> bool:
        """Train and evaluate until ``cfg.epochs`` are done (True) or a stop was requested (False)."""
        for _ in range(self.progress.evaluated, self.cfg.epochs):
            if self.progress.epoch == self.progress.evaluated and not self.train_epoch():
                return False
            if not self.evaluate_epoch():
                return False
        self.writer.wait()
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
        for batch in timer.iterate(batches, lambda b: b[1].shape[0]):
            loss = self._step(batch)
            loss_sum += loss
            now = time.perf_counter()
            self._count_step(int(batch[1].shape[0]), now - last, timer.last_wait)
            if p.step_in_epoch % self.cfg.log_every == 0 or p.step_in_epoch == steps:
                self._log_window(timer, loss, epoch, steps)
            if p.step_in_epoch < steps:
                stop, due = self._agree()
                if stop or due:
                    self._checkpoint("stop" if stop else "interval", loss_sum)
                    if stop:
                        return False
            last = time.perf_counter()  # a checkpoint's blocking time is not a step's
        p.epoch += 1
        p.epoch_loss_sum += loss_sum.item()
        if self._stop_requested():
            self._checkpoint("stop")
            return False
        return True

    def _step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        parts = self.parts
        images, labels = batch[0], batch[1]
        loss = parts.step(images, labels)
        if self._ids is not None:
            self._ids.write(json.dumps({"epoch": self.progress.epoch + 1, "step": self.progress.step + 1,
                                        "ids": batch[2].tolist()}) + "\n")
            self._ids.flush()
        return loss

    def _count_step(self, images: int, seconds: float, waited: float) -> None:
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        p.epoch_images += images
        p.epoch_seconds += seconds
        p.epoch_data_seconds += waited
        self.metrics.step(images, seconds, waited, self.board.beat("training"))
        self.writer.check()

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

    def _sync(self) -> None:
        for d in self.parts.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        return self._agree(check_due=False)[0]

    def _agree(self, check_due: bool = True) -> tuple[bool, bool]:
        """(stop, checkpoint due), agreed by every rank in one collective."""
        stop, due = self.ranks.any(self.stop.requested, check_due and self._checkpoint_due())
        if stop:
            self.stop.request("a stop on another rank")  # keeps this rank's own signal name if it had one
        return stop, due

    def _data_error(self, exc: BaseException, split: str):
        self.metrics.samples_failed.inc()
        return diagnose(exc, self.manifest, split)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate_epoch(self) -> bool:
        """Evaluate the epoch just trained, step the schedule, checkpoint; False when stopped."""
        p, parts = self.progress, self.parts
        self.board.update(phase="evaluating")
        try:
            mine = evaluate(parts.evaluator, self._eval_batches(), autocast_dtype=parts.autocast,
                            channels_last=self.cfg.model.channels_last)
            result = resume.combine(self.ranks.gather(mine))  # every rank's share of the split
        except Interrupted:
            self._checkpoint("stop")
            return False
        lr = parts.schedule.lrs[0]
        dropped = parts.schedule.step(result.top1_error)
        record = dict(epoch=p.epoch, lr=lr, train_loss=p.epoch_loss_sum / max(p.step_in_epoch, 1),
                      top1_error=result.top1_error, top5_error=result.top5_error, val_loss=result.loss,
                      images_per_s=p.epoch_images / max(p.epoch_seconds, 1e-9),
                      data_share=p.epoch_data_seconds / max(p.epoch_seconds, 1e-9))
        p.history.append(record)
        p.evaluated = p.epoch
        self.report_evaluation(record)
        self.log.say(f"epoch {p.epoch}/{self.cfg.epochs}: train loss {record['train_loss']:.4f}, val top-1 error "
                     f"{result.top1_error:.1%} (chance {self.chance:.1%}), top-5 error {result.top5_error:.1%} "
                     f"({self.cfg.eval_views}-view), {record['images_per_s']:.1f} img/s"
                     + (f"; lr -> {parts.schedule.lrs[0]:g}" if dropped else ""))
        if self.ranks.is_main:
            self.log.history(p.history, self.chance)
        self._checkpoint("epoch")
        # Memory after the epoch's checkpoint copy: the soak test compares it across epochs.
        self.log.event("eval", **record, lr_dropped=dropped, **memory())
        return not self._stop_requested()

    def report_evaluation(self, record: dict[str, Any]) -> None:
        self.metrics.evaluation(record["top1_error"], record["top5_error"], record["val_loss"])
        self.board.update(last_evaluation={k: record[k] for k in ("epoch", "top1_error", "top5_error", "val_loss")})

    def _eval_batches(self):
        for images, labels, *_ in guarded(self.parts.val, lambda exc: self._data_error(exc, "val")):
            if self._stop_requested():
                raise Interrupted
            self.board.beat("evaluating")
            yield images, labels

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        """This rank's view (the loop agrees on it with the other ranks)."""
        c = self.cfg.checkpoint
        by_steps = c.every_steps > 0 and self.progress.step % c.every_steps == 0
        by_time = c.every_seconds > 0 and time.monotonic() - self._last_checkpoint_time >= c.every_seconds
        return by_steps or by_time

    def _checkpoint(self, reason: str, loss_sum: torch.Tensor | None = None) -> None:
        """Checkpoint now (rank 0 writes; every rank hands in its loader position).  Blocks for
        the copy to host memory only, or until the file is durable when stopping."""
        start = time.perf_counter()
        self.board.beat("checkpointing")
        p = self.progress
        if loss_sum is not None:  # fold the device-side loss sum into the saved progress
            p.epoch_loss_sum += loss_sum.item()
            loss_sum.zero_()
        per_rank = self.ranks.gather((self.parts.train.state_dict(), rng_state()))
        if self.ranks.is_main and self.saved_at != (p.step, p.evaluated):
            self.writer.wait()  # its buffers are about to be refilled
            payload = resume.payload(self, reason, [s[0] for s in per_rank], [s[1] for s in per_rank])
            self.writer.save(payload, p.step)
            self.saved_at = (p.step, p.evaluated)
        if reason == "stop":
            self.writer.wait()
            self.ranks.barrier()  # every rank exits once the file is durable
        blocked = time.perf_counter() - start
        self.metrics.checkpoint_seconds.observe(blocked)
        self.log.event("checkpoint_started", reason=reason, step=p.step, blocked_seconds=round(blocked, 4))
        self._last_checkpoint_time = time.monotonic()
        self.board.beat("training")

    def _written(self, path: Path, seconds: float) -> None:
        """In the writer thread, once ``path`` is durable."""
        now = time.time()
        self.metrics.last_checkpoint.set(now)
        self.board.update(last_checkpoint={"path": str(path), "time": now})
        self.log.say(f"checkpoint {path} ({seconds:.2f} s to write)")
        self.log.event("checkpoint", path=str(path), write_seconds=round(seconds, 4))

    def restore(self, path: Path, saved: dict[str, Any]) -> None:
        """Continue from the checkpoint ``saved`` (read from ``path``); see ``service.resume``."""
        resume.restore(self, path, saved)

    def close(self) -> None:
        """Let a write in flight finish (its error, if any, is secondary to the one being raised)."""
        try:
            self.writer.wait()
        except ServiceError:
            pass
        if self._ids is not None:
            self._ids.close()
