"""The optimisation loop every family shares: steps, validation, checkpoints, stop and resume.

:func:`fit` is a generator of :class:`~napari_pathology.training.events.TrainEvent`
driving any :class:`~napari_pathology.models.PathologyModel` over an
iterator of ``(x, y)`` batches. It validates every ``eval_every`` steps,
keeps the best checkpoint and the last one, both written atomically with
their spec, provenance, metrics and weight digest, plus the optimiser state
beside the last one so a stopped or crashed job resumes where its last save
left it (:mod:`.checkpoints`). Setting the ``stop`` event ends the job after
the current step, saved. An out-of-memory error splits the batch into halves
with gradient accumulation (same effective batch, half the memory) and says
so. Mixed precision on CUDA (bf16 where supported, fp16 with a gradient
scaler otherwise).

The best checkpoint is the one whose validation metric ``best_metric`` is
highest (``best_mode="max"``) or lowest (``"min"``): a family passes its
:attr:`~napari_pathology.families.Family.best_metric` and ``best_mode``.
The loss is a hook too (a family's :meth:`~napari_pathology.families.Family.loss`,
see :mod:`.losses`): ``forward(model, x)`` may return the logits alone, a
``(logits, extras)`` pair or a mapping with ``"logits"`` (e.g. an
attention-MIL network whose forward also computes an instance loss), and
``loss(output, targets)`` receives that output whole. Without a loss hook
it is cross-entropy of the logits.

The job's files and threads (:func:`check_output`, :func:`check_resume`,
:func:`torch_threads`...) live in :mod:`.checkpoints` and :mod:`.runtime`
and are re-exported here. No Qt, no napari.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from napari_pathology.devices import is_out_of_memory, resolve_device
from napari_pathology.fileio import OutputError, atomic_path, ensure_writable_dir
from napari_pathology.models.registry import (
    PathologyModel,
    save_checkpoint,
    save_torch_file,
    tensors_digest,
)
from napari_pathology.training.checkpoints import (
    check_output,
    check_resume,
    checkpoint_paths,
    load_last_checkpoint,
    resume_state,
)
from napari_pathology.training.common import check_count, check_flag
from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.losses import as_float, cross_entropy, logits_of
from napari_pathology.training.runtime import (
    MAX_DEFAULT_THREADS,
    default_threads,
    default_threads_here,
    seed_everything,
    torch_threads,
)

__all__ = [
    "BEST_MODES",
    "MAX_DEFAULT_THREADS",
    "LoopSettings",
    "check_output",
    "check_resume",
    "checkpoint_paths",
    "default_threads",
    "default_threads_here",
    "fit",
    "load_last_checkpoint",
    "logits_of",
    "recalibrate_batch_norm",
    "resume_state",
    "seed_everything",
    "torch_threads",
]

#: Whether a higher (``"max"``) or lower (``"min"``) value of the best metric is better.
BEST_MODES = ("max", "min")


@dataclass(frozen=True)
class LoopSettings:
    """How long and where to train.

    Parameters
    ----------
    steps : int
        Optimiser steps in total (including those of a resumed job).
    out : Path
        Best checkpoint path; the last one is ``<stem>.last.pt`` beside it.
    eval_every : int
        Steps between validations (and saves).
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool
        Mixed precision on CUDA.
    log_every : int
        Steps between ``step`` events.
    precise_bn_batches : int
        Before each validation, batch-norm statistics are recomputed as a
        plain average over this many training batches ("precise BN"): the
        running averages of a fast-moving network are too noisy to evaluate
        with. 0 keeps the running averages.
    micro_batch : int, optional
        Items per forward and backward (gradients accumulated over the
        batch, the same optimiser step); none: the whole batch at once,
        split only when out of memory.
    """

    steps: int
    out: Path
    eval_every: int = 100
    device: str = "cpu"
    amp: bool = True
    log_every: int = 5
    precise_bn_batches: int = 16
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("steps", "eval_every", "log_every"):
            check_count(self, name)
        check_count(self, "micro_batch", optional=True)
        check_count(self, "precise_bn_batches", 0)
        check_flag(self, "amp")


def _check_best(best_metric: str, best_mode: str) -> float:
    """The sign that turns ``best_metric`` into a higher-is-better key; refuses a bad metric or mode."""
    if not isinstance(best_metric, str) or not best_metric:
        raise TrainingError(f"best_metric must be the name of a validation metric, got {best_metric!r}")
    if best_mode not in BEST_MODES:
        raise TrainingError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    return 1.0 if best_mode == "max" else -1.0


def _autocast(device: torch.device, amp: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    if not (amp and device.type == "cuda"):
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def fit(
    model: PathologyModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    validate: Callable[[PathologyModel], dict[str, Any]] | None = None,
    forward: Callable[[PathologyModel, torch.Tensor], torch.Tensor] | None = None,
    scheduler: Any = None,
    provenance: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    resume: dict[str, Any] | None = None,
    after_validation: Callable[[PathologyModel, int], str | None] | None = None,
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    best_metric: str = "score",
    best_mode: str = "max",
    shrink: Callable[[], str | None] | None = None,
) -> Generator[TrainEvent, None, TrainResult]:
    """Train ``model`` on ``batches`` (cross-entropy unless ``loss``); yields events, returns the result.

    Parameters
    ----------
    model : PathologyModel
        The model (its spec goes into every checkpoint).
    batches : iterator of (x, y)
        Normalised inputs ``(B, ...)`` and class indices ``(B,)``, endless or
        at least ``settings.steps`` long.
    optimizer : torch.optim.Optimizer
        Over the parameters to train.
    settings : LoopSettings
        Steps, output, validation interval, device, mixed precision.
    validate : callable, optional
        ``validate(model) -> metrics``; must include ``best_metric`` to choose
        the best checkpoint. Without it the last is best.
    forward : callable, optional
        ``forward(model, x) -> output`` (default ``model(x)``), e.g. a head on
        cached features. The output is the logits, a ``(logits, extras)`` pair
        or a mapping with ``"logits"``; it goes to ``loss`` whole.
    scheduler : optional
        Stepped once per optimiser step.
    provenance : dict, optional
        Data and hyper-parameters, stored in each checkpoint.
    stop : threading.Event, optional
        Set it to finish the current step, save and return.
    resume : dict, optional
        From :func:`resume_state`: continue at its step with its optimiser state.
    after_validation : callable, optional
        ``after_validation(model, step) -> message`` runs after each validation
        (batch norm freshly recalibrated), e.g. hard-negative mining; its
        message becomes a ``log`` event.
    loss : callable, optional
        ``loss(output, targets) -> scalar tensor`` of one (micro-)batch, mean
        over its items, where ``output`` is what ``forward`` returned (its
        logits in float32): a family's loss hook
        (:meth:`napari_pathology.families.Family.loss`). Default:
        cross-entropy of :func:`logits_of` ``(output)``. E.g. CLAM's
        ``0.7 * F.cross_entropy(out[0], y) + 0.3 * out[1]["instance_loss"]``.
    best_metric : str
        The validation metric that picks the best checkpoint (a family's
        ``best_metric``); ``validate`` must return it. A NaN never becomes best.
    best_mode : {"max", "min"}
        Whether a higher or a lower ``best_metric`` is better.
    shrink : callable, optional
        Called when a step runs out of memory with one item per micro-batch:
        makes the step need less memory (e.g. a smaller tile) and returns a
        message saying how (a ``log`` event; the step is retried), or returns
        None when it cannot (then the out-of-memory error ends the job).

    Raises
    ------
    TrainingError
        For a bad ``best_metric``/``best_mode``, a validation without
        ``best_metric``, a state to resume that chose its best by another
        metric, a loss that is not finite, or out of memory with one sample.
    """
    sign = _check_best(best_metric, best_mode)
    device = resolve_device(settings.device)
    criterion = loss or cross_entropy
    best_path, last_path, state_path = checkpoint_paths(settings.out)
    ensure_writable_dir(best_path.parent)
    forward = forward or (lambda m, x: m(x))
    model.to(device).train()
    context, scaler = _autocast(device, settings.amp)
    step, history, best_score, best_metrics = 0, [], -math.inf, {}
    if resume:
        try:
            optimizer.load_state_dict(resume["optimizer"])
            step = int(resume["step"])
            history = list(resume.get("history", []))
            best_score = float(resume.get("best_score", -math.inf))
            best_metrics = dict(resume.get("best_metrics", {}))
            chosen = (resume.get("best_metric", best_metric), resume.get("best_mode", best_mode))
            if scheduler is not None and "scheduler" in resume:
                scheduler.load_state_dict(resume["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise TrainingError(
                f"cannot resume from {state_path}: its optimiser state does not fit this model "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            ) from error
        if chosen != (best_metric, best_mode):
            raise TrainingError(
                f"cannot resume from {state_path}: its best checkpoint was chosen by {chosen[0]} "
                f"({chosen[1]}), this job chooses by {best_metric} ({best_mode})"
            )
    saved_step = step  # the step of the last checkpoint on disk
    provenance = {**(provenance or {}), "loop": {**asdict(settings), "out": str(settings.out)}}
    started = time.perf_counter()
    split = 1  # micro-batches per batch (doubled on out-of-memory)
    smoothed: float | None = None
    stopped = False
    last_metrics: dict[str, Any] = {}

    def event(kind: str, **kw: Any) -> TrainEvent:
        return TrainEvent(kind, step, settings.steps, elapsed=time.perf_counter() - started, **kw)

    def kept() -> str:
        if last_path.is_file():
            return f"the last good checkpoint {last_path} is intact"
        return "no checkpoint was written yet"

    def saving(write: Callable[[], Any]) -> None:
        try:
            write()
        except OutputError as error:  # full or read-only disk: one line, and what is still there
            raise OutputError(error.errno or 0, f"{error}; {kept()}") from error

    def save_last(metrics: dict[str, Any]) -> TrainEvent:
        nonlocal saved_step
        prov = {**provenance, "step": step, "stopped": stopped}
        optimizer_state = optimizer.state_dict()
        state = {
            "optimizer": optimizer_state, "step": step, "history": history,
            "best_score": best_score, "best_metrics": best_metrics,
            "best_metric": best_metric, "best_mode": best_mode,
            "sha256": tensors_digest(optimizer_state),
        }  # fmt: skip
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        saving(lambda: save_checkpoint(model, last_path, provenance=prov, metrics=metrics))
        saving(lambda: save_torch_file(state, state_path))
        saved_step = step
        return event("checkpoint", path=str(last_path), metrics=metrics, message=f"saved {last_path.name}")

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    def run_validation() -> list[TrainEvent]:
        nonlocal best_score, best_metrics, last_metrics
        events = []
        if settings.precise_bn_batches > 0 and not stopping():  # Stop keeps the running averages
            recalibrate_batch_norm(
                model, forward, batches, settings.precise_bn_batches, device, context, stop=stop
            )
        if validate is not None:
            model.eval()
            with torch.no_grad(), context:
                metrics = {k: _plain(v) for k, v in validate(model).items()}
            model.train()
            if best_metric not in metrics:
                raise TrainingError(
                    f"the validation returned no {best_metric!r} (the metric that picks the best "
                    f"checkpoint), only {', '.join(map(repr, metrics)) or 'nothing'}"
                )
            score = _best_key(metrics[best_metric], sign)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            events.append(event("validation", metrics=metrics, message=f"step {step}: {shown}"))
        else:  # no validation set: the latest weights are the best known
            metrics, score = {}, float(step)
        metrics["step"] = step
        last_metrics = metrics
        if validate is not None:
            history.append(dict(metrics))
        if validate is None:  # without validation the best is the latest: one save, then a file copy
            best_score, best_metrics = score, dict(metrics)
            events.append(save_last(metrics))
            saving(lambda: copy_file_atomic(last_path, best_path))
            events.append(event("checkpoint", path=str(best_path), metrics=metrics, message="best = last"))
            return events
        if score > best_score or not best_path.exists():
            best_score, best_metrics = score, dict(metrics)
            saving(
                lambda: save_checkpoint(
                    model, best_path, provenance={**provenance, "step": step}, metrics=metrics
                )
            )
            events.append(
                event(
                    "checkpoint", path=str(best_path), metrics=metrics, message=f"new best: {best_path.name}"
                )
            )
        events.append(save_last(metrics))
        return events

    yield event(
        "start", message=f"training {model.spec.name} on {device} from step {step} to {settings.steps}"
    )
    try:
        while step < settings.steps:
            if stop is not None and stop.is_set():
                stopped = True
                break
            x, y = next(batches)
            if settings.micro_batch is not None:
                split = max(split, math.ceil(len(x) / settings.micro_batch))
            while True:
                parts = min(split, len(x))
                try:
                    value = _train_step(
                        model, forward, optimizer, x, y, device, context, scaler, parts, criterion
                    )
                    break
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if split < len(x):  # first smaller micro-batches, then whatever the job can shrink
                        split *= 2
                        message = (
                            f"splitting each batch of {len(x)} into {split} parts "
                            "(same effective batch, gradients accumulated)"
                        )
                    else:
                        message = shrink() if shrink is not None else None
                    if not message:
                        raise TrainingError(
                            f"out of memory on {device} even with one sample per micro-batch; "
                            "use a smaller model or another device"
                        ) from error
                    yield event("log", message=f"out of memory on {device}: {message}")
            if not math.isfinite(value):
                raise TrainingError(
                    f"the loss became {value} at step {step + 1}; lower the learning rate ({kept()})"
                )
            if scheduler is not None:
                scheduler.step()
            step += 1
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            history.append({"step": step, "loss": value})
            if step % settings.log_every == 0 or step == settings.steps:
                yield event(
                    "step", loss=smoothed, message=f"step {step}/{settings.steps} loss {smoothed:.4f}"
                )
            if (step % settings.eval_every == 0 or step == settings.steps) and not stopping():
                yield from run_validation()
                if after_validation is not None and step < settings.steps:
                    message = after_validation(model, step)
                    if message:
                        yield event("log", message=message)
    except GeneratorExit:  # the consumer went away (viewer closed, Ctrl-C): keep the steps done
        stopped = True
        if step > saved_step:
            save_last(last_metrics)
        raise
    stopped = stopped or stopping()  # set during the last step: its validation was skipped
    if stopped and step > saved_step:  # Stop costs one save of the steps not yet on disk
        yield save_last(last_metrics)
        if validate is None:
            saving(lambda: copy_file_atomic(last_path, best_path))
    elif not stopped and step > 0 and not last_path.exists():
        yield from run_validation()
    best = f"best {best_path.name}" if best_path.exists() else "no best checkpoint yet (no validation ran)"
    message = f"{'stopped' if stopped else 'finished'} at step {step}; {best}"
    yield event("done", metrics=best_metrics, path=str(best_path), message=message)
    return TrainResult(
        best=best_path if best_path.exists() else None, last=last_path if last_path.exists() else None,
        step=step, stopped=stopped, metrics=best_metrics, history=history,
    )  # fmt: skip


def copy_file_atomic(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` through a temporary file in ``target``'s folder (never half a file)."""
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)
    return target


def recalibrate_batch_norm(
    model: torch.nn.Module,
    forward: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n_batches: int,
    device: torch.device,
    context: Any = None,
    stop: threading.Event | None = None,
) -> int:
    """Replace the running statistics of training-mode batch norms by their mean over ``n_batches``.

    Batch norms that are frozen (eval mode while the model trains, as a
    frozen trunk) are left alone. When ``stop`` is set the mean is over the
    batches done so far (at least one). Returns the number of layers recalibrated.
    """
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    norms = [m for m in model.modules() if isinstance(m, batch_norm) and m.training]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches
    try:
        context = context if context is not None else torch.autocast(device.type, enabled=False)
        with torch.no_grad(), context:
            for done in range(n_batches):
                if done and stop is not None and stop.is_set():
                    break
                x, _y = next(batches)
                forward(model, x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return len(norms)


def _train_step(
    model: PathologyModel,
    forward: Callable[[PathologyModel, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    context: Any,
    scaler: Any,
    split: int,
    criterion: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    n = len(x)
    for part_x, part_y in zip(x.chunk(split), y.chunk(split), strict=True):
        part_x = part_x.to(device, non_blocking=True)
        part_y = part_y.to(device, non_blocking=True)
        with context:
            loss = criterion(as_float(forward(model, part_x)), part_y) * (len(part_x) / n)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total


def _best_key(value: Any, sign: float) -> float:
    """``value`` as a higher-is-better key (``sign`` -1 for a lower-is-better metric); NaN: never best."""
    try:
        key = sign * float(value)
    except (TypeError, ValueError):
        raise TrainingError(f"the best metric must be a number, got {value!r}") from None
    return key if math.isfinite(key) or key == math.inf else -math.inf


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor | float) or hasattr(value, "item"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return value
