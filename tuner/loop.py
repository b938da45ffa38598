"""The one training loop: drives any registered trainer through the trainer contract, with no per-method code.

`train(config, resume)` builds the accelerate `Accelerator` (precision, gradient accumulation, DDP and
the user's DeepSpeed / FSDP config), loads the base parts, lets the trainer mark what trains, applies the
memory levers, builds data, optimizer and schedule, then runs optimizer steps with checkpoints, a
NaN/inf guard, logging, validation grids and the final `trainer.save`.

Randomness. The loop owns one `torch.Generator` per process (seeded from `train.seed` and the rank) and
puts it into every micro-batch as `batch["generator"]`; trainers pass it on, e.g.
`diffusion_loss(parts, batch, options, generator=batch.get("generator"))`, so noise and timesteps come
from a stream the loop checkpoints and restores. Global RNGs (python, numpy, torch, CUDA) are restored
too, for whatever a trainer draws from them. The data order depends only on (seed, epoch, index).

Exactness. A checkpoint is written at an optimizer-step boundary and holds the trained parameters,
optimizer, schedule, grad scaler, EMA, every RNG state and the data position (epoch, batch), so a run
resumed from step N continues bit for bit as the uninterrupted run would have (CPU, fp32).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from tuner import runtime
from tuner.checkpoint import (
    PREFIX,
    Position,
    TrainingState,
    capture_rng,
    checkpoint_step,
    list_checkpoints,
    resolve_resume,
    restore_rng,
)
from tuner.config import RunConfig, save_config
from tuner.errors import TrainingStopped, TunerError
from tuner.processes import lost_process, register_process
from tuner.progress import ProgressBar, StopSignal, closing_summary, run_summary
from tuner.run_folder import RunLock, check_writable, clear_for_overwrite, finished_run, refuse_new_run
from tuner.storage import DiskFull, disk_full, is_no_space, save_checkpoint
from tuner.tracking import Tracker

logger = logging.getLogger(__name__)

MAX_SKIPPED_STEPS = 25  # fp16: consecutive overflow-skipped steps before the guard calls it divergence


def train(config: RunConfig, resume: str | None = None, *, summary: bool = True, overwrite: bool = False) -> Path:
    """Train `config.method` on `config.data`; returns the run folder (artifacts, checkpoints, grids, logs).

    `summary`: end with where everything is, how to load it and how to publish it (`tuner demo` prints its own).
    `overwrite`: replace a finished or interrupted run in the folder (never done without it)."""
    from tuner.data.cache import default_cache_dir

    run_dir = Path(config.train.output_dir)
    runtime.check_environment(config)
    check_writable(run_dir, "train.output_dir")
    if resume and overwrite:
        raise TunerError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
    accelerator = runtime.make_accelerator(config)
    with ExitStack() as held:
        if accelerator.is_main_process:  # one run at a time per folder; the other processes are this run's own
            held.enter_context(RunLock(run_dir, "train.output_dir"))
            held.enter_context(RunLock(default_cache_dir(config), "data.cache_dir"))
        resume_from = _starting_point(config, accelerator, resume, overwrite)
        if resume_from is _FINISHED:
            return run_dir
        try:
            return _train(config, accelerator, resume_from, summary)
        except Exception as exc:
            done = list_checkpoints(run_dir)
            if is_no_space(exc) and not isinstance(exc, DiskFull):
                raise disk_full(run_dir, "the run's outputs", done[-1] if done else resume_from) from None
            if (lost := lost_process(exc, accelerator, run_dir, done[-1] if done else resume_from)) is not None:
                raise lost from None
            raise


_FINISHED = Path("<finished>")


def _starting_point(config: RunConfig, accelerator, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to continue from (None: a fresh start), or `_FINISHED` when a finished run has nothing
    left to train. A finished run is never retrained, and checkpoints of two runs never mix."""
    tc = config.train
    run_dir = Path(tc.output_dir)
    done = finished_run(run_dir)
    if resume is None:
        if done is not None and not overwrite:
            raise refuse_new_run(run_dir, done)
        if overwrite:
            accelerator.wait_for_everyone()  # every process has read the folder before it is cleared
            if accelerator.is_main_process and (removed := clear_for_overwrite(run_dir)):
                logger.info("--overwrite: removed the earlier run in %s (%s); its cache is kept", run_dir,
                            ", ".join(removed))  # fmt: skip
            accelerator.wait_for_everyone()
        elif list_checkpoints(run_dir):
            raise TunerError(
                f"train.output_dir = {str(run_dir)!r} already holds checkpoints of an earlier run; continue it with "
                "--resume latest, replace it with --overwrite, or pick another output_dir, so checkpoints of two "
                "runs never mix"
            )
        return None
    if done is not None and done.checkpoint is None:
        if done.steps is not None and done.steps >= tc.max_train_steps:
            return _nothing_to_do(accelerator, done.folder, done.steps)
        raise TunerError(
            f"--resume {resume}: {run_dir} holds a finished run that kept no checkpoint "
            "(train.keep_final_checkpoint = false), so it cannot train further; nothing was changed. Start a new "
            "run with --overwrite or another output_dir"
        )
    resume_from = resolve_resume(run_dir, resume, tc.resume_fallback)
    step = checkpoint_step(resume_from) if resume_from is not None else None
    if done is not None and step is not None and step >= tc.max_train_steps:
        return _nothing_to_do(accelerator, done.folder, step)
    return resume_from


def _nothing_to_do(accelerator, run_dir: Path, steps: int) -> Path:
    if accelerator.is_main_process:
        print(
            f"{run_dir} is a finished run ({steps} steps); nothing to do, nothing was changed. To train it further: "
            f"--resume latest --set train.max_train_steps=N (N > {steps})",
            flush=True,
        )
    return _FINISHED


def _train(config: RunConfig, accelerator, resume_from: Path | None, summary: bool) -> Path:
    from accelerate.utils import DistributedType, set_seed

    from tuner.data import build_training_data
    from tuner.losses import LossOptions
    from tuner.models import check_trainable, load_parts
    from tuner.optim import build_lr_scheduler, build_optimizer
    from tuner.registry import get_trainer

    tc = config.train
    run_dir = Path(tc.output_dir)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    register_process(run_dir, rank, world)
    set_seed(tc.seed)
    m = config.model
    weight_dtype = runtime.WEIGHT_DTYPES[tc.mixed_precision]
    trainer = get_trainer(config.method)(config)
    check_trainable(m.pretrained_model_name_or_path, m.revision, trainer.capability(), LossOptions.from_config(config),
                    m.quantize)  # fmt: skip
    parts = load_parts(m.pretrained_model_name_or_path, m.revision, m.variant, m.vae, accelerator.device, weight_dtype,
                       tokenizer_from=m.tokenizer_from, quantize=m.quantize)  # fmt: skip
    parts.guidance_scale = tc.guidance_scale
    trainables = trainer.prepare(parts)
    params = trainables.parameters()
    runtime.apply_precision(parts, params, tc.mixed_precision)
    runtime.memory_levers(parts, config)
    data = build_training_data(config, parts, trainables.needs, rank=rank, world_size=world)
    runtime.ready_for_steps(parts, trainables, data, config)
    accelerator.wait_for_everyone()

    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    optimizer = build_optimizer(config.optimizer, trainables.param_groups, accelerator.device, fsdp=sharded)
    scheduler = build_lr_scheduler(config.optimizer, optimizer, tc.max_train_steps)
    wrapped, optimizer, scheduler = runtime.prepare(
        accelerator, parts, trainables.modules, optimizer, scheduler, tc.train_batch_size
    )
    for module in wrapped.values():
        module.train()
    ema = _make_ema(params, tc) if tc.use_ema else None
    set_seed(tc.seed, device_specific=True)  # after init: each process draws its own dropout masks etc.
    generator = torch.Generator().manual_seed((tc.seed * 1_000_003 + rank) % 2**63)
    state = TrainingState(
        trainable=runtime.trainable_tensors({k: accelerator.unwrap_model(v) for k, v in wrapped.items()}, params),
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        position=Position(),
        scaler=accelerator.scaler,
        ema=ema,
        rank=rank,
        world_size=world,
        sharded=sharded,
        config=config.to_dict(),
    )
    if tc.checkpointing_steps <= tc.max_train_steps or tc.keep_final_checkpoint:
        state.check_storable()
    if resume_from is not None:
        for warning in state.load(resume_from):
            logger.warning("resume: %s", warning)
        trainer.load(parts, resume_from)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
        print(run_summary(config, parts, optimizer, data, world, resume_from), flush=True)

    tracker = Tracker(run_dir, tc.report_to, main, config.to_dict(), state.position.global_step)
    bar = ProgressBar(tc.max_train_steps, state.position.global_step, main)
    last_good = resume_from
    try:
        with StopSignal(bar.write) as stop:
            last_good = _run_steps(
                config, accelerator, trainer, parts, wrapped, params, data, state, tracker, bar, stop, last_good
            )
        accelerator.wait_for_everyone()
        trainer.global_step = state.position.global_step  # steps done, for what `save` records
        if ema is not None:
            ema.copy_to(params)
        runtime.restore_freed(parts)  # the save and its round trip load every part
        with runtime.full_parameters(accelerator, wrapped):
            for key, module in wrapped.items():
                runtime.place(parts, key, accelerator.unwrap_model(module, keep_fp32_wrapper=False))
            if config.validation.enabled and not _validated_at(config, state.position.global_step):
                _validate(accelerator, trainer, parts, {}, None, params, state, tracker, run_dir)
            if main:
                trainer.save(parts, run_dir).write(run_dir)
                _finish(config, run_dir)
                if summary:
                    print(closing_summary(run_dir), flush=True)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        tracker.close()
    accelerator.end_training()
    return run_dir


def _finish(config: RunConfig, run_dir: Path) -> None:
    """The end of a run: the last grid as `grids/final.png`, the model card, and the upload when asked."""
    from tuner.hub import publish, write_model_card

    grids = sorted((run_dir / "grids").glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], run_dir / "grids" / "final.png")
    write_model_card(run_dir)
    if config.hub.push:
        publish(run_dir, config.hub.repo_id, private=config.hub.private)


def _run_steps(config, accelerator, trainer, parts, wrapped, params, data, state, tracker, bar, stop, last_good):
    """Optimizer steps from `state.position` to `max_train_steps`; returns the newest checkpoint folder."""
    tc, pos = config.train, state.position
    run_dir, max_norm = Path(tc.output_dir), config.optimizer.max_grad_norm or math.inf
    stream = _BatchStream(data, pos)
    skipped, interval = 0, []
    strays = runtime.stray_parameters(accelerator, wrapped, params)
    while pos.global_step < tc.max_train_steps:
        trainer.global_step = pos.global_step
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(tc.gradient_accumulation_steps):
            batch = runtime.to_device(next(stream), accelerator.device)
            batch["generator"] = state.generator
            with accelerator.accumulate(*wrapped.values()):
                with accelerator.autocast():
                    loss = trainer.compute_loss(parts, batch)
                accelerator.backward(loss)
            step_loss += loss.detach().float() / tc.gradient_accumulation_steps
        if strays:
            runtime.average_gradients(strays, accelerator.num_processes)
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        flags = torch.stack([step_loss, torch.tensor(float(stop.requested), device=step_loss.device)])
        flags = accelerator.reduce(flags, "sum")  # one collective: every process sees the same loss and stop flag
        loss_value, stop_requested = flags[0].item() / accelerator.num_processes, flags[1].item() > 0
        norm_value = float(grad_norm) if grad_norm is not None else 0.0
        # fp16: the grad scaler skips overflowing steps by itself, so only the loss is checked here.
        bad_norm = accelerator.scaler is None and not math.isfinite(norm_value)
        if not math.isfinite(loss_value) or bad_norm:
            raise _diverged(config, pos.global_step + 1, loss_value, norm_value, last_good)
        lrs = {f"lr/{g['name']}": g["lr"] for g in state.optimizer.param_groups}  # the rates this step uses
        state.optimizer.step()
        if state.optimizer.step_was_skipped:
            skipped += 1
            if skipped >= MAX_SKIPPED_STEPS:
                raise _diverged(config, pos.global_step + 1, loss_value, norm_value, last_good)
        else:
            skipped = 0
            state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        trainer.after_optimizer_step(parts)
        if state.ema is not None:
            state.ema.step(params)
        pos.global_step += 1
        pos.epoch, pos.batch = stream.epoch, stream.batch
        bar.update(loss_value, next(iter(lrs.values())))
        interval.append(loss_value)
        if pos.global_step % tc.logging_steps == 0 or pos.global_step == tc.max_train_steps:
            tracker.log({"loss": sum(interval) / len(interval), "grad_norm": norm_value, **lrs}, pos.global_step)
            interval = []
        if stop_requested or pos.global_step % tc.checkpointing_steps == 0:
            last_good = save_checkpoint(state, run_dir, tc.checkpoints_total_limit, accelerator.is_main_process,
                                        accelerator.wait_for_everyone, last_good)  # fmt: skip
        if stop_requested:
            raise TrainingStopped(
                f"interrupted after step {pos.global_step}; checkpoint saved at {last_good}. "
                f"Continue with --resume latest (or --resume {last_good})"
            )
        if _validated_at(config, pos.global_step) and config.validation.enabled:
            with runtime.full_parameters(accelerator, wrapped):
                _validate(accelerator, trainer, parts, wrapped, state.ema, params, state, tracker, run_dir)
    if tc.keep_final_checkpoint and not (run_dir / f"{PREFIX}{pos.global_step}").is_dir():
        last_good = save_checkpoint(state, run_dir, tc.checkpoints_total_limit, accelerator.is_main_process,
                                    accelerator.wait_for_everyone, last_good)  # fmt: skip
    return last_good


class _BatchStream:
    """Micro-batches across epoch boundaries, counting the position a checkpoint records."""

    def __init__(self, data, position: Position):
        self.data, self.epoch, self.batch = data, position.epoch, position.batch
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data.iterate(self.epoch, start=self.batch))
            try:
                batch = next(self._it)
                self.batch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        raise TunerError(f"the data yields no batches in epoch {self.epoch}; see `tuner check-data`")


def _diverged(config: RunConfig, step: int, loss: float, grad_norm: float, last_good: Path | None) -> TrainingStopped:
    what = f"loss = {loss}" if not math.isfinite(loss) else f"gradient norm = {grad_norm}"
    lr = config.optimizer.learning_rate
    causes = [f"the learning rate is too high (optimizer.learning_rate = {lr:g}; lower it or add lr_warmup_steps)"]
    if config.train.mixed_precision == "fp16":
        causes.append("fp16 overflow (train.mixed_precision = 'fp16'; try 'bf16')")
    else:
        causes.append("a broken example in the data (see `tuner check-data`)")
    safe = (
        f"the last good checkpoint is {last_good} (--resume {last_good})"
        if last_good
        else "no checkpoint was written yet"
    )
    return TrainingStopped(
        f"step {step}: {what}, so training stopped before applying it. Likely causes: {'; or '.join(causes)}. "
        f"Nothing saved was touched; {safe}"
    )


def _make_ema(params, tc):
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=tc.ema_decay)


def _validated_at(config: RunConfig, step: int) -> bool:
    every = config.validation.validation_steps
    return bool(every) and step % every == 0


@contextmanager
def _ema_weights(ema, params):
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _validate(accelerator, trainer, parts, wrapped, ema, params, state, tracker, run_dir: Path) -> None:
    """Main process renders the trainer's grid with unwrapped (EMA) weights; no RNG stream is disturbed.

    `wrapped`: modules to swap for their unwrapped selves while rendering (empty when already unwrapped)."""
    if accelerator.is_main_process:
        rng = capture_rng(state.generator)
        for key, module in wrapped.items():
            runtime.place(parts, key, accelerator.unwrap_model(module))
            module.eval()
        try:
            with _ema_weights(ema, params), torch.no_grad(), accelerator.autocast():
                image = trainer.validation_images(parts, state.position.global_step)
        finally:
            for key, module in wrapped.items():
                module.train()
                runtime.place(parts, key, module)
            restore_rng(rng, state.generator)
        if image is not None:
            path = run_dir / "grids" / f"step-{state.position.global_step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            tracker.log_image("validation", image, state.position.global_step)
    accelerator.wait_for_everyone()
