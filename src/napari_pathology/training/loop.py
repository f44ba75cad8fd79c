"""The optimisation loop every family shares: steps, validation, checkpoints, stop and resume.

:func:`fit` is a generator of :class:`~napari_pathology.training.events.TrainEvent`
driving any :class:`~napari_pathology.models.PathologyModel` over an
iterator of ``(x, y)`` batches. It validates every ``eval_every`` steps,
keeps the best checkpoint (highest validation ``score``) and the last one,
both written atomically with their spec, provenance, metrics and weight
digest, plus the optimiser state beside the last one so a stopped or crashed
job resumes where its last save left it (:func:`check_resume`, called by the
trainers before they start any reader thread). Setting the ``stop`` event
ends the job after the current step, saved. :func:`check_output` refuses an
unwritable output folder and an existing model (unless resuming or told to
overwrite) before any work; :func:`torch_threads` holds torch's CPU threads
at the job's setting for its duration. An out-of-memory error
splits the batch into halves with gradient accumulation (same effective
batch, half the memory) and says so. Mixed precision on CUDA (bf16 where
supported, fp16 with a gradient scaler otherwise).

No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_pathology.devices import is_out_of_memory, resolve_device
from napari_pathology.fileio import OutputError, ensure_writable_dir
from napari_pathology.models.registry import (
    ModelError,
    PathologyModel,
    load_untrusted,
    save_checkpoint,
    save_torch_file,
    tensors_digest,
)
from napari_pathology.training.common import check_count, check_flag
from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult

__all__ = [
    "LoopSettings",
    "check_output",
    "check_resume",
    "checkpoint_paths",
    "default_threads",
    "default_threads_here",
    "fit",
    "load_last_checkpoint",
    "recalibrate_batch_norm",
    "resume_state",
    "seed_everything",
    "torch_threads",
]

#: Most CPU threads a job uses by default (more contend with each other on a shared machine).
MAX_DEFAULT_THREADS = 4


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
    """

    steps: int
    out: Path
    eval_every: int = 100
    device: str = "cpu"
    amp: bool = True
    log_every: int = 5
    precise_bn_batches: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("steps", "eval_every", "log_every"):
            check_count(self, name)
        check_count(self, "precise_bn_batches", 0)
        check_flag(self, "amp")


def checkpoint_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(best, last, state)`` paths for a job writing ``out``."""
    best = Path(out)
    if best.suffix not in (".pt", ".pth", ".ckpt"):
        best = best.with_name(best.name + ".pt")
    last = best.with_name(best.stem + ".last.pt")
    state = best.with_name(best.stem + ".last.state.pt")
    return best, last, state


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA) and return a generator for sampling."""
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


_JOB_THREADS = threading.local()


@contextlib.contextmanager
def default_threads_here(threads: int | None) -> Iterator[None]:
    """Within the block, on this thread, :func:`default_threads` is ``threads`` (None: unchanged).

    A queue that runs jobs beside a GUI sets 1, so that a job whose settings
    leave ``threads`` unset does not compete with the viewer for the cores.
    """
    previous = getattr(_JOB_THREADS, "threads", None)
    _JOB_THREADS.threads = threads if threads is not None else previous
    try:
        yield
    finally:
        _JOB_THREADS.threads = previous


def default_threads() -> int:
    """CPU threads for a job by default: the usable cores, at most :data:`MAX_DEFAULT_THREADS`.

    Inside :func:`default_threads_here` (a training queue's jobs), its value.
    """
    override = getattr(_JOB_THREADS, "threads", None)
    if override is not None:
        return max(1, int(override))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: :func:`default_threads`), then restore.

    On a shared CPU, more threads than free cores make small networks much
    slower (threads wait on each other), so every job sets its own count.
    """
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise TrainingError(f"threads must be at least 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def check_output(out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written or that would replace a trained model.

    Returns the best checkpoint path.

    Raises
    ------
    OutputError
        When the folder cannot be created or written (one line naming it).
    TrainingError
        When ``out`` (or its last checkpoint) exists and neither ``resume`` nor ``overwrite`` is set.

    """
    best, last, _state = checkpoint_paths(out)
    ensure_writable_dir(best.parent)
    if not (resume or overwrite):
        existing = next((p for p in (best, last) if p.exists()), None)
        if existing is not None:
            raise TrainingError(
                f"{existing} exists; use --resume to continue it or choose another --out, "
                "or --overwrite to replace it"
            )
    return best


def load_last_checkpoint(out: str | os.PathLike[str]) -> PathologyModel:
    """The last checkpoint of a job writing ``out``, to resume; :class:`TrainingError` if there is none."""
    from napari_pathology.models.registry import load_checkpoint

    last = checkpoint_paths(out)[1]
    if not last.is_file():
        raise TrainingError(
            f"cannot resume: {last} does not exist (no checkpoint was saved); start without --resume"
        )
    try:
        return load_checkpoint(last)
    except ModelError as error:
        raise TrainingError(f"cannot resume: {error}") from error


def resume_state(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The optimiser state and step saved beside the last checkpoint of ``out``, checked.

    Raises
    ------
    TrainingError
        One line naming the file when it is missing, holds code, is torn,
        lacks the optimiser state or step, or its tensors do not match their digest.

    """
    _, last, state_path = checkpoint_paths(out)
    if not state_path.is_file():
        raise TrainingError(
            f"cannot resume: the optimiser state {state_path} is missing (it is written beside "
            f"{last.name}); start without --resume, or with --overwrite to train {Path(out).name} afresh"
        )
    try:
        state = load_untrusted(state_path, f"cannot resume from {state_path}")
    except ModelError as error:
        raise TrainingError(str(error)) from error
    where = f"cannot resume from {state_path}"
    if not isinstance(state, Mapping) or not isinstance(state.get("optimizer"), Mapping):
        raise TrainingError(f"{where}: it holds no optimiser state (not a file written by a training job)")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TrainingError(f"{where}: its step {step!r} is not a whole number >= 0")
    digest = state.get("sha256")
    if digest is not None and digest != tensors_digest(state.get("optimizer")):
        raise TrainingError(
            f"{where}: the file is damaged: its tensors do not match the digest saved with them"
        )
    return dict(state)


def check_resume(out: str | os.PathLike[str]) -> tuple[PathologyModel, dict[str, Any]]:
    """The last checkpoint and optimiser state of ``out``, both checked; call it before any other work.

    Raises
    ------
    TrainingError
        One line, when either is missing, damaged or holds code.

    """
    last = checkpoint_paths(out)[1]
    if not last.is_file():
        raise TrainingError(
            f"cannot resume: {last} does not exist (no checkpoint was saved); start without --resume"
        )
    state = resume_state(out)
    model = load_last_checkpoint(out)
    return model, state


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
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
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
        ``validate(model) -> metrics``; must include ``"score"`` (higher is
        better) to choose the best checkpoint. Without it the last is best.
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``), e.g. a head on cached features.
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
        ``loss(logits, targets) -> scalar tensor`` of one (micro-)batch, mean
        over its items (default cross-entropy): a family's loss hook
        (:meth:`napari_pathology.families.Family.loss`).
    """
    device = resolve_device(settings.device)
    criterion = loss or F.cross_entropy
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
            if scheduler is not None and "scheduler" in resume:
                scheduler.load_state_dict(resume["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise TrainingError(
                f"cannot resume from {state_path}: its optimiser state does not fit this model "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            ) from error
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
            "sha256": tensors_digest(optimizer_state),
        }  # fmt: skip
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        saving(lambda: save_checkpoint(model, last_path, provenance=prov, metrics=metrics))
        saving(lambda: save_torch_file(state, state_path))
        saved_step = step
        return event("checkpoint", path=str(last_path), metrics=metrics, message=f"saved {last_path.name}")

    def run_validation() -> list[TrainEvent]:
        nonlocal best_score, best_metrics, last_metrics
        events = []
        if settings.precise_bn_batches > 0:
            recalibrate_batch_norm(model, forward, batches, settings.precise_bn_batches, device, context)
        if validate is not None:
            model.eval()
            with torch.no_grad(), context:
                metrics = {k: _plain(v) for k, v in validate(model).items()}
            model.train()
            score = float(metrics.get("score", -math.inf))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            events.append(event("validation", metrics=metrics, message=f"step {step}: {shown}"))
        else:  # no validation set: the latest weights are the best known
            metrics, score = {}, float(step)
        metrics["step"] = step
        last_metrics = metrics
        if validate is not None:
            history.append(dict(metrics))
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
            while True:
                try:
                    loss = _train_step(
                        model, forward, optimizer, x, y, device, context, scaler, split, criterion
                    )
                    break
                except Exception as error:
                    if not is_out_of_memory(error) or split >= len(x):
                        if is_out_of_memory(error):
                            raise TrainingError(
                                f"out of memory on {device} even with one sample per micro-batch; "
                                "use a smaller model or another device"
                            ) from error
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    split *= 2
                    yield event("log", message=(
                        f"out of memory on {device}: splitting each batch of {len(x)} into {split} parts "
                        "(same effective batch, gradients accumulated)"
                    ))  # fmt: skip
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at step {step + 1}; lower the learning rate ({kept()})"
                )
            if scheduler is not None:
                scheduler.step()
            step += 1
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            history.append({"step": step, "loss": loss})
            if step % settings.log_every == 0 or step == settings.steps:
                yield event(
                    "step", loss=smoothed, message=f"step {step}/{settings.steps} loss {smoothed:.4f}"
                )
            if step % settings.eval_every == 0 or step == settings.steps:
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
    if stopped and step > 0:
        yield save_last(last_metrics)
    elif step > 0 and not last_path.exists():
        yield from run_validation()
    best = f"best {best_path.name}" if best_path.exists() else "no best checkpoint yet (no validation ran)"
    message = f"{'stopped' if stopped else 'finished'} at step {step}; {best}"
    yield event("done", metrics=best_metrics, path=str(best_path), message=message)
    return TrainResult(
        best=best_path if best_path.exists() else None, last=last_path if last_path.exists() else None,
        step=step, stopped=stopped, metrics=best_metrics, history=history,
    )  # fmt: skip


def recalibrate_batch_norm(
    model: torch.nn.Module,
    forward: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n_batches: int,
    device: torch.device,
    context: Any = None,
) -> int:
    """Replace the running statistics of training-mode batch norms by their mean over ``n_batches``.

    Batch norms that are frozen (eval mode while the model trains, as a
    frozen trunk) are left alone. Returns the number of layers recalibrated.
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
            for _ in range(n_batches):
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
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    n = len(x)
    for part_x, part_y in zip(x.chunk(split), y.chunk(split), strict=True):
        part_x = part_x.to(device, non_blocking=True)
        part_y = part_y.to(device, non_blocking=True)
        with context:
            loss = criterion(forward(model, part_x).float(), part_y) * (len(part_x) / n)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor | float) or hasattr(value, "item"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return value
