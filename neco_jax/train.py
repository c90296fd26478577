"""NeCo post-training: the big_vision-style loop around one jitted, data-parallel train step.

In the order they run: the config read into settings (neco_jax/settings.py) -> mesh -> input -> restore a
checkpoint of the workdir, or start from `model.init` (neco_jax/weights.py) -> the step (neco_jax/step.py),
compiled ahead and checked against the devices' memory -> the loop: a step, then its periodic actions
(neco_jax/periodic.py: stop agreement, non-finite check, log, checkpoint, evaluation) -> curves (metrics.png)
-> export of both backbones. The loop keeps the device busy: batches are put on the devices ahead of use
(neco_jax/device_feed.py) and the metrics summed there; the host waits for the device only at log and
checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from input_pipeline import make_train_loader
from neco_jax import checkpoint as ckpt_lib
from neco_jax import curves, device_feed, distributed, memory_fit, optim, periodic, run_record, sharding
from neco_jax import metrics_writer as mw
from neco_jax import train_state as ts
from neco_jax.errors import ConfigError, StepMemoryError
from neco_jax.precision import true_float32
from neco_jax.settings import TrainSettings, check_runnable, from_config
from neco_jax.step import Training, build_training, compile_loop_step, device_part
from neco_jax.weights import export_backbones, initial_params, random_params

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Run:
    """What the loop runs on (built by `_start`)."""

    settings: TrainSettings
    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    loader: Any
    total_steps: int
    checkpointer: ckpt_lib.Checkpointer
    models: ts.Models
    state: ts.TrainState
    step_fn: Callable  # the compiled loop step with the run's schedules bound: (state, batch, sums)
    monitor: Any


@true_float32  # fp32 runs are fp32 on GPUs too (JAX's default there is TF32); bf16 is config.model.dtype
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, **options) -> dict[str, Any]:
    """Run (or resume) training in `workdir` (see `_train` for the options); returns the last logged metrics,
    the step reached and `stopped_by_signal` (the signal number when SIGTERM/SIGINT stopped it early, else
    None). A signal before the first step stops at once, with one line saying that nothing was saved."""
    stop = periodic.StopAgreement()
    stop.install()
    try:
        return _train(config, os.fspath(workdir), stop, **options)
    except periodic.StoppedBeforeTheLoop as stopped:
        log.warning(
            "signal %d before the first step: stopped, nothing was saved; rerun the same command to start",
            stopped.signum,
        )
        return {"step": None, "total_steps": None, "state": None, "stopped_by_signal": stopped.signum}
    finally:
        stop.restore()  # a signal during the export or the plot is the default again: the run is done


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop: periodic.StopAgreement,
    *,
    devices=None,
    stop_after: int | None = None,
    allow_config_change: bool = False,
    make_monitor: Callable[[Any, str, int], Any] | None = None,
) -> dict[str, Any]:
    """The run of `train_and_evaluate`; `stop`: its signal handling, which the loop starts.

    devices: the devices of the mesh (default all); stop_after: stop (with a checkpoint) once this many
    steps are done, as a pre-empted job would (tests of exact resume); allow_config_change: resume a
    checkpoint under a config that changes the computation (see neco_jax.run_record); make_monitor: builds
    the evaluation of `config.eval` from (its settings, workdir, steps per epoch), i.e. evaluation.monitor's
    (main.py passes it: this package does not import the evaluation package), needed when eval.every_epochs > 0.
    """
    settings = from_config(config)
    check_runnable(settings)
    if make_monitor is None and settings.eval.every_epochs:
        raise ConfigError(
            f"config.eval.every_epochs={settings.eval.every_epochs} needs an evaluation monitor: train with main.py "
            "(or pass make_monitor=evaluation.monitor.make_monitor to train_and_evaluate)"
        )
    distributed.initialize(settings.run.init_timeout_s)  # before anything touches a device
    distributed.check_same_config(config, workdir)
    run_record.prepare_workdir(workdir)
    run = _start(settings, config, workdir, devices, allow_config_change, make_monitor)
    last = _loop(run, stop, stop_after)
    done = int(distributed.host_copy(run.state.step))
    if jax.process_index() == 0 and done > 0:
        log.info("curves: %s", curves.write_plot(workdir))
    if done >= run.total_steps and settings.run.export_at_end and jax.process_index() == 0:
        files = export_backbones(settings, run.models, run.state, os.path.join(workdir, "export"))
        log.info("exported: %s", ", ".join(files))
    return {**last, "step": done, "total_steps": run.total_steps, "state": run.state, "stopped_by_signal": stop.signum}


def _start(settings, config, workdir, devices, allow_config_change, make_monitor) -> _Run:
    """The mesh, the loader, the state (restored from the workdir's newest intact checkpoint, else initial) and
    the compiled step of a run."""
    mesh = sharding.make_mesh(devices)
    global_batch = settings.optim.batch_size
    sharding.check_batch_size(global_batch, mesh)
    platform, processes = mesh.devices.flat[0].platform, jax.process_count()
    log.info(
        "mesh: %d devices (%s), %d processes; global batch %d", mesh.devices.size, platform, processes, global_batch
    )
    loader = make_train_loader(
        settings.views, settings.loader, batch_size=global_batch // jax.process_count(), seed=settings.run.seed
    )
    total_steps = settings.optim.total_steps or settings.optim.num_epochs * loader.steps_per_epoch
    per_epoch = loader.steps_per_epoch
    log.info("data: %d images, %d steps per epoch; training %d steps", loader.num_records, per_epoch, total_steps)
    monitor = make_monitor(settings.eval, workdir, per_epoch) if make_monitor else None
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=settings.run.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:  # resume: shapes and dtypes only (nothing allocated), values from the checkpoint
        run_record.check_resume(workdir, config, allow_change=allow_config_change)
        student, teacher = jax.eval_shape(lambda: random_params(settings, settings.run.seed))
    else:
        student, teacher, init_desc = initial_params(settings)
    training = build_training(settings, total_steps, student, teacher)
    repl = sharding.replicated(mesh)
    del student, teacher
    if latest is not None:  # straight into the mesh's replicated layout, on any number of processes
        latest, state, data_state = checkpointer.restore_newest_intact(ckpt_lib.abstract_like(training.state, repl))
        distributed.set_loader_state(loader, data_state)
        init_desc = f"resumed from {checkpointer.directory}/{latest}"
    else:
        state = jax.device_put(training.state, repl)
    training = training._replace(state=state)
    log.info("init: %s", init_desc)
    log.info("optimizer groups (tensors): %s", optim.group_counts(training.labels))
    if jax.process_index() == 0:
        mw.log_parameter_overview(ts.to_pure(distributed.host_copy(state.student)), "student")
    compiled, models = _compiled_step(settings, training, mesh)
    schedules = jax.device_put(training.schedules, repl)

    def step_fn(state, batch, sums):
        return compiled(state, batch, sums, schedules)

    return _Run(settings, config, workdir, mesh, loader, total_steps, checkpointer, models, state, step_fn, monitor)


def _compiled_step(settings: TrainSettings, training: Training, mesh) -> tuple[Any, ts.Models]:
    """The loop's step compiled ahead and checked against the devices' memory (never an OOM inside the first
    step), model.remat="auto" resolved: the compiled program and the models of the rematerialisation taken."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit = memory_fit.device_limit(local)
    if limit is None:
        log.debug("the %s backend reports no memory limit: the step's memory is not checked", local[0].platform)
    fit, models = compile_loop_step(settings, training, mesh, limit)
    remat = settings.model.remat
    if not fit.fits:
        batch, devices = settings.optim.batch_size, mesh.devices.size
        message = memory_fit.no_fit_message(
            fit,
            limit,
            f"a {local[0].device_kind}",
            dtype=settings.model.dtype,
            batch_size=batch,
            devices=devices,
            remat=remat,
        )
        raise StepMemoryError(message)
    log.info(
        "step: model.remat=%s (%s), %.2f GiB per device (%.2f GiB temporaries)%s",
        fit.remat,
        "chosen" if remat == "auto" else "as set",
        fit.memory.peak / memory_fit.GIB,
        fit.memory.temporaries / memory_fit.GIB,
        f" of {limit / memory_fit.GIB:.1f} GiB" if limit else "",
    )
    return fit.compiled, models


def _loop(run: _Run, stop: periodic.StopAgreement, stop_after: int | None) -> dict[str, Any]:
    """Steps until the run's total (or `stop_after`, or an agreed stop signal), each followed by its periodic
    actions; returns the last logged row. Closes the run's loader, checkpointer and metrics writer."""
    s, repl = run.settings.run, sharding.replicated(run.mesh)
    start = int(distributed.host_copy(run.state.step))
    end = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
    writer = mw.MetricsWriter(run.workdir)
    clock = mw.StepClock(run.total_steps, run.settings.optim.batch_size, start)
    logger = periodic.Log(s.log_every_steps, writer, clock, run.total_steps)
    checkpoint = periodic.Checkpoint(s.checkpoint_every_steps, run.checkpointer)
    check = periodic.NonFiniteCheck(run.settings.optim, run.checkpointer.directory, repl, (logger, checkpoint))
    evaluate = periodic.Evaluate(run.monitor, run.models.teacher_backbone, writer, clock)
    stop.start(s.stop_check_every_steps)  # from here a signal is a checkpoint at an agreed step boundary
    put = lambda batch: sharding.global_batch(device_part(batch), run.mesh)  # noqa: E731
    feed = device_feed.prefetch(run.loader, put, device_feed.PREFETCH_BATCHES)
    try:
        for step_no in range(start + 1, end + 1):
            fed = next(feed)
            clock.data_ready()
            run.state, metrics, check.sums = run.step_fn(run.state, fed.batch, check.sums)
            device_feed.release(fed.batch)
            if step_no == start + 1 and jax.process_index() == 0:  # the run has started: record it
                run_record.record_start(run.workdir, run.config, start)
                mw.set_aside_rows_after(run.workdir, start)
            tick = periodic.Tick(step_no, step_no == end, stop(step_no, step_no == end))
            if check.due(tick):
                sums, host_metrics = check(tick, metrics)
                logger.add(sums)
                if logger.due(tick):
                    logger(tick, host_metrics, fed.data_state["bad_files"])
            if checkpoint.due(tick):
                checkpoint(tick, run.state, fed.data_state)
            clock.step_done()
            if evaluate.due(tick):
                evaluate(tick, run.state)
            if tick.stopping is not None:
                log.warning("signal %d: checkpoint of step %d saved, stopping", tick.stopping, step_no)
                break
    finally:
        feed.close()
        run.loader.close()
        run.checkpointer.close()
        writer.close()
    return logger.last
