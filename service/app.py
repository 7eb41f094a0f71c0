"""``python -m service [--config FILE] [--section.key value ...]``: the training service.

Start-up order matters for the user: settings are checked first (exit 2 naming the key), then
that the run directory can be written (exit 5 naming it), the signal handlers are installed, the
run directory is locked (another service's: exit 5 naming it, ``service.rundir_lock``), the ranks
join and compare their settings (exit 2 on every rank naming those that differ,
``service.rank_settings``) and the
HTTP port is bound next (a taken port is exit 3 at once), then the shards are checked (exit 1
naming the shard), the model and loaders are built, and the newest valid checkpoint in the run
directory is resumed.  Then the loop runs until all epochs are done or a SIGTERM/SIGINT/SIGHUP stops it
after a checkpoint (exit 0 either way), or the training diverges (exit 6, ``service.divergence``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import torch

from common.config import ConfigError, load_config, split_config_arg, to_dict
from common.config_help import print_help, settings_help, wants_help
from pipeline.stats import manifest_stats
from service import PARENT, data_stats, run_ids
from service.build import apply_cuda_sync, build, compile_note, resolve, share_cores
from service.checkpointer import Resumed
from service.config import TrainConfig, decay_problem, validate
from service.data_fit import check_fits_data
from service.dist import RankError, Ranks, peer_gone
from service.errors import EXIT_CONFIG, EXIT_OK, DataError, PeerGone, ServiceError, record_exit
from service.loop import Trainer
from service.metrics import ServiceMetrics, build_labels
from service.rank_settings import check_same_settings
from service.rank_stops import RankStops
from service.rundir import check_run_dir, clear_run
from service.rundir_lock import RunDirLock
from service.runlog import RunLog
from service.server import HttpEndpoint
from service.shard_check import ShardCheck
from service.signals import StopFlag, follow_launcher
from service.state import data_fingerprint, identity, param_digest
from service.status import StatusBoard
from service.unclean_end import UncleanEnd
from shards import manifest as contract


def parse(argv: list[str]) -> TrainConfig:
    """The validated config of a command line; ``ServiceError`` (exit 2) naming the key if not."""
    try:
        path, overrides = split_config_arg(argv)
        cfg = load_config(TrainConfig, path, overrides)
    except ConfigError as exc:
        raise ServiceError(EXIT_CONFIG, str(exc)) from None
    problems = validate(cfg)
    if problems:
        raise ServiceError(EXIT_CONFIG, "invalid settings: " + "; ".join(problems))
    return cfg


def start(cfg: TrainConfig, manifest: contract.Manifest, ranks: Ranks, metrics: ServiceMetrics, board: StatusBoard,
          log: RunLog, stop: StopFlag, check_first: bool = False) -> Trainer:
    """Check the shards of ``manifest`` (read by ``run_service``, once), build everything, resume
    the newest valid checkpoint if there is one.  ``check_first``: every shard is checked before
    training whatever ``data.verify`` says (``service.unclean_end``)."""
    try:
        contract.check(manifest)  # both splits and the statistics: the shard check reads both (was: a KeyError)
        checking = replace(cfg, data=replace(cfg.data, verify="before")) if check_first else cfg
        check = ShardCheck(checking, manifest, ranks, log, metrics, stop, board)
        # Every shard's files, once, before DALI opens one; names a missing, truncated or (cached /
        # verify before) corrupt shard to stop on or leave out.
        excluded = check.prepare()
        stats = manifest_stats(manifest)  # read once: the identity's summary and both loaders
    except contract.ManifestError as exc:
        raise DataError(str(exc)) from None
    check_fits_data(cfg, manifest, excluded, ranks)
    # In the identity: a resume on changed statistics is refused (service.data_stats).
    ident = identity(cfg, data_fingerprint(manifest.record), data_stats.summary(stats))
    parts = build(cfg, ranks, manifest, excluded, shard_check=check, stats=stats)
    trainer = Trainer(parts, ranks, manifest, ident, run_ids.new_run_id(cfg.out), metrics, board, log, stop)
    found = trainer.resume()  # rank 0 chooses the file and the id, every rank restores it (service.checkpointer)
    p = trainer.progress
    announce(trainer, found, excluded, log)
    # Known now (a resumed run: its checkpoint's), not at the first log interval: no dip to NaN or 0
    # at a restart; /status says what the gauges say.
    epoch, lr = min(p.evaluated + 1, cfg.epochs), parts.schedule.lrs[0]
    board.update(run_id=trainer.run_id, **ranks.info(), global_batch=cfg.loader.batch_size * ranks.world_size,
                 lr_rule=parts.lr_rule, epochs=cfg.epochs, epoch=epoch, lr=lr, step=p.step, device=cfg.device,
                 layout=cfg.model.layout, resumed_from=str(found.path) if found else None)
    metrics.epoch.set(epoch)
    metrics.lr.set(lr)
    metrics.chance(manifest.splits["train"].class_counts)
    board.beat("starting")
    if ranks.is_main:
        log.write_json("config.json", to_dict(cfg))
    log.event("start", run_id=trainer.run_id, copied_from=found.copied_from if found else None,
              run_dir=trainer.checkpoints.run_dir, resumed_from=str(found.path) if found else None, step=p.step,
              **ranks.info(), config=to_dict(cfg))
    # Last: a start that fails before here (a full disk under config.json) has no thread to stop,
    # and ``_serve`` stops it from here on (it left .shard-checks.json.tmp behind at exit)
    check.start(p.step)
    return trainer


def announce(trainer: Trainer, found: Resumed | None, excluded: frozenset[str], log: RunLog) -> None:
    """Say what starts: a new run, a resumed one (a copied directory's under its own id), what it
    trains on and how."""
    cfg, ranks, parts, p, manifest = trainer.cfg, trainer.ranks, trainer.parts, trainer.progress, trainer.manifest
    if found and found.copied_from:
        log.say(f"{cfg.out} is a copy of run {found.copied_from}'s directory {found.original} (its checkpoint "
                f"{found.path} was written there): this copy trains as run {trainer.run_id} from here on")
    if found:
        log.say(f"resuming run {trainer.run_id} from {found.path}: {p.evaluated} epoch(s) done, "
                f"{trainer.position()} (step {p.step} in all)")
    else:
        log.say(f"new run {trainer.run_id} in {cfg.out}")
    if found and ranks.is_main:  # the checkpoint's epochs, not those of a newer one that was lost
        log.history_as_resumed(p.history, trainer.chance, found.path)
    images = sum(s.samples for s in manifest.splits["train"].shards if s.tar.name not in excluded)
    log.say(f"train: {images} images, {manifest.num_classes} classes (chance top-1 error "
            f"{trainer.chance:.1%}), device {cfg.device}, layout {cfg.model.layout}, batch {cfg.loader.batch_size}"
            f" x {ranks.world_size} rank(s), {len(parts.train)} steps per epoch, {cfg.epochs} epochs")
    log.say(f"data parallel: {parts.lr_rule}" if ranks.distributed else parts.lr_rule)
    if note := compile_note(cfg):
        log.say(note)


def finish(trainer: Trainer, finished: bool, log: RunLog) -> int:
    """Wait for the last checkpoint, say where everything is, exit 0."""
    trainer.board.beat("finishing" if finished else "stopping")  # the last write, the shard check
    trainer.checkpoints.wait()  # a failed write: exit 4 on every rank
    if finished:  # no run ends 0 on shards it has not checked
        trainer.parts.shard_check.finish(trainer.progress.step)
    else:  # halted before the stop's line, the run's last word: its pass, ending meanwhile, said its own after it
        trainer.parts.shard_check.close()
    trainer.ranks.barrier()
    p, out = trainer.progress, trainer.cfg.out
    if finished:
        if trainer.ranks.is_main and p.history:
            log.history(p.history, trainer.chance)
        past = (f", more than --epochs {trainer.cfg.epochs} asks: the run stands at {trainer.position()}, which its "
                "newest checkpoint holds (a larger --epochs trains on)") if p.past(trainer.cfg.epochs) else ""
        log.say(f"finished: {p.evaluated} epoch(s), {p.step} steps{past}. Curve: {out / 'curve.png'}, history: "
                f"{out / 'history.json'}, JSON log: {log.jsonl_path}, checkpoints: {out}/checkpoint-*.pt")
    else:
        again = ("run the same command without --fresh true to resume (with it, a start deletes this checkpoint)"
                 if trainer.cfg.fresh else "run the same command again to resume")
        log.say(f"stopped ({trainer.stop.signal_name}) at step {p.step}, {trainer.position()}; checkpoint in {out}: "
                f"{again}")
    ranks = trainer.ranks
    digest = {"param_digest": param_digest(trainer.parts.model)} if ranks.distributed else {}
    log.event("finished" if finished else "stopped", step=p.step, epoch=p.epoch, reason=trainer.stop.signal_name,
              **digest, **ranks.info())
    trainer.board.update(phase="finished" if finished else "stopped")  # until the endpoint closes
    return EXIT_OK


def run_service(cfg: TrainConfig, ending: bool = False) -> int:
    """Run a validated config to the end (or to a requested stop); returns the exit code.
    ``ending``: the process ends with it (``main``): stop signals stay ignored afterwards.

    The settings that depend on torchrun's environment (the ranks' ports, their scaled lr) are
    checked first, the run directory next; a ``--shards`` that is no shard directory at all (a
    typo, the images themselves) then, before the port, joining or a log: a run directory this
    start created is removed again (still empty), so nothing is left behind.  That read of
    ``manifest.json`` is the start's only one (``start`` checks the rest on what it read)."""
    ranks = env_ranks(cfg)
    created = check_run_dir(cfg.out)
    try:
        manifest = contract.read(cfg.shards)
    except contract.ManifestError as exc:
        if created:
            with contextlib.suppress(OSError):
                cfg.out.rmdir()
        raise DataError(str(exc)) from None
    cfg = resolve(cfg, ranks)
    apply_cuda_sync(cfg)  # before anything creates a CUDA context
    stop = StopFlag().install()  # before joining: torchrun may signal while the ranks meet
    follow_launcher(stop, PARENT)  # torchrun's agent killed: a stop, not ranks training on alone
    allowed, lock, stops = None, None, None
    try:
        stops = RankStops(ranks, stop.peer_stopped)  # a stop of any rank reaches every rank, joined or not
        stop.tell = stops.post
        lock = RunDirLock(cfg.out, ranks.rank)  # before joining: a second job refuses, never waits for peers
        waiting = f"rank {ranks.rank}: stopped ({{signal}}) while waiting for the other ranks to join; nothing to save"
        with stop.nothing_to_save(waiting if ranks.distributed else "stopped ({signal}) while starting; nothing to "
                                  "save"):  # blocked in C++ there: the loop could not see it
            ranks.start(torch.device(cfg.device))
        check_same_settings(cfg, data_fingerprint(manifest.record), ranks)  # before --fresh deletes anything
        cfg, allowed = share_cores(cfg, *ranks.core_peers())
        return _serve(cfg, manifest, ranks, stop)
    except RuntimeError as exc:  # a collective whose peer rank is gone: that rank's line says why
        if not (ranks.distributed and peer_gone(exc)):
            raise
        raise PeerGone(ranks.rank) from None
    finally:  # joining or the endpoint may fail too: an in-process caller gets its state back
        if stops is not None:
            stops.close()
        stop.uninstall(ending)
        ranks.close()
        if lock is not None:
            lock.close(created)
        if allowed is not None:
            os.sched_setaffinity(0, allowed)


def env_ranks(cfg: TrainConfig) -> Ranks:
    """This process's place among torchrun's ranks, or ``ServiceError`` (exit 2, every rank alike,
    before any joins) where ``cfg`` does not fit them: a port past 65535, or the lr that N ranks
    scale to past the weight decay's bound (one rank's lr is checked by ``validate``)."""
    try:
        ranks = Ranks.from_env()
        ranks.http_port(cfg.http.port)
    except RankError as exc:
        raise ServiceError(EXIT_CONFIG, str(exc)) from None
    problem = decay_problem(cfg.optim, ranks.world_size)
    if problem:
        raise ServiceError(EXIT_CONFIG, f"invalid settings: {problem}")
    return ranks


def serve_http(cfg: TrainConfig, ranks: Ranks, metrics: ServiceMetrics, board: StatusBoard) -> HttpEndpoint:
    """This rank's endpoint, or every rank stops with the first failure (a taken port: exit 3).
    Each rank binds its own port after joining; when one could not, the others used to run on
    into their next collective and die of its departure (a gloo traceback on rank 0)."""
    endpoint, error = None, None
    try:
        endpoint = HttpEndpoint(cfg.http.host, ranks.http_port(cfg.http.port), metrics.registry, board)
    except ServiceError as exc:
        error = (exc.code, str(exc))
    failed = [(rank, e) for rank, e in enumerate(ranks.gather(error)) if e is not None]
    if failed:
        if endpoint is not None:
            endpoint.close()
        rank, (code, message) = failed[0] if error is None else (ranks.rank, error)
        raise ServiceError(code, message if rank == ranks.rank else f"rank {rank}: {message}")
    return endpoint.start()


def _serve(cfg: TrainConfig, manifest: contract.Manifest, ranks: Ranks, stop: StopFlag) -> int:
    """The metrics endpoint, the run log and the trainer, for the joined ranks."""
    metrics = ServiceMetrics(build_labels(",".join(cfg.model.devices) or cfg.device, cfg.model.layout,
                                          ranks.world_size))
    board = StatusBoard(cfg.http.stall_seconds, phase="starting", last_checkpoint=None, last_evaluation=None)
    metrics.follow(board)  # before the endpoint serves: no scrape sees a heartbeat of 0
    metrics.watch_disk(cfg.out)
    endpoint = serve_http(cfg, ranks, metrics, board)
    log = RunLog(cfg.out, ranks.suffix(), console=ranks.is_main)  # one console voice: rank 0's
    trainer, unclean, failure = None, None, None
    try:
        log.say(f"metrics: {endpoint.url('/metrics')}  status: {endpoint.url('/status')}  "
                f"health: {endpoint.url('/healthz')}")
        log.say(f"run directory: {cfg.out} (curve.png and history.json after each epoch, log.jsonl, checkpoints)")
        if cfg.fresh:
            if ranks.is_main:
                clear_run(log)
            ranks.barrier()  # no rank opens its log before rank 0 has deleted the old ones
        log.open()
        unclean = UncleanEnd(cfg.out, ranks, log)  # a silent end last time: the shards are checked first
        trainer = start(cfg, manifest, ranks, metrics, board, log, stop, check_first=unclean.found)
        return finish(trainer, trainer.run(), log)
    except ServiceError as exc:
        failure = exc
        raise
    finally:
        if unclean is not None:
            unclean.clear()
        if trainer is not None:
            trainer.parts.shard_check.close()
            trainer.close()
        if failure is not None:
            last_words(failure, metrics, board, endpoint, stop)
        endpoint.close()
        log.close()


def last_words(failure: ServiceError, metrics: ServiceMetrics, board: StatusBoard, endpoint: HttpEndpoint,
               stop: StopFlag) -> None:
    """A diagnosed failure's code on ``/metrics`` (``alexnet_exit_code``) until the next scrape has
    read it: the stack's alerts then say why the trainer is down (AlexNetDiverged: a restart would
    resume the same weights and diverge again), where Prometheus saw only ``up == 0``.  Not for a
    code that is no failure, nor an undiagnosed one, nor while a stop signal asks to go."""
    if failure.code == EXIT_OK or not failure.recorded or stop.requested:
        return
    metrics.exit_code.set(failure.code)
    board.update(phase="failed", exit_code=failure.code)
    failure.say()  # now, not after the wait: a person at the terminal learns it at once
    endpoint.last_words(lambda: not stop.requested)


def main(argv: list[str]) -> int:
    """Entry point: a user-facing error is one line on stderr and its exit code (see service.errors)."""
    if wants_help(argv):
        text = settings_help(TrainConfig, "python -m service", "The AlexNet training service: trains on shards written "
                             "by `make shards`, checkpoints to --out, serves /metrics, /healthz and /status.")
        return print_help(text)
    try:
        return run_service(parse(argv), ending=True)
    except ServiceError as exc:
        exc.say()
        if exc.recorded:
            record_exit(exc.code)
        return exc.code
