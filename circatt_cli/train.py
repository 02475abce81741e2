"""`circatt train`: the authors' recipe (Adam, MSE, cosine schedule, gradient clipping, projections after
every step, NaN/blow-up backtracking), resumable bit-for-bit, on one device or many through DDP."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .console import make_console, print_error, print_note
from .data import CropSampler, DataError, load_images
from .devices import resolve_device
from .evaluate import check_image_folders, run_eval
from .imageio import ImageError
from .metrics import psnr
from .model import DEFAULT_PRESET, PRESETS, GroupCDL, GroupCDLConfig

CHECKPOINT = "last.pt"
LOG = "log.jsonl"
# What `Trainer.save` writes into a checkpoint, and `read_checkpoint` requires.
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "sampler", "samplers", "count", "config", "options", "rng", "world"})
BLOWUP = 100.0
MAX_BACKTRACKS = 20
LOSSES = ("mse", "balanced")
# "balanced" weighs a crop's MSE by 1 / (sigma + BALANCE_OFFSET): a denoiser's MSE grows about linearly
# with sigma, so plain MSE lets the high noise levels dominate; the offset keeps sigma ~ 0 finite.
BALANCE_OFFSET = 5.0 / 255.0


@dataclass
class TrainOptions:
    """Everything a run needs; sigmas on the 0-255 scale, `batch` per process."""

    data: Path
    out: Path
    preset: str = DEFAULT_PRESET
    config: GroupCDLConfig | None = None
    steps: int = 20000
    batch: int = 12
    crop: int = 128
    sigma_min: float = 0.0
    sigma_max: float = 55.0
    sigma_low_share: float = 0.5
    loss: str = "mse"
    lr: float = 5e-4
    lr_min: float = 2e-6
    hold: float = 0.67
    clip: float = 0.05
    epoch_steps: int = 100
    seed: int = 0
    resume: bool = False
    device: str | None = None
    val_dir: Path | None = None
    val_images: int = 8
    checkpoint_minutes: float = 3.0
    max_minutes: float | None = None
    stop_at: int | None = None
    log_every: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:  # the CLI says it in its own words; this guards the Python API
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 < self.sigma_low_share < 1.0:
            raise ValueError(f"sigma_low_share must be in (0, 1), got {self.sigma_low_share}")

    def model_config(self) -> GroupCDLConfig:
        return self.config or GroupCDLConfig.preset(self.preset)


def read_checkpoint(path: Path) -> dict:
    """The state saved in RUN/last.pt; raises DataError (one line) for a file that is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"{path}: not a readable circatt train checkpoint ({err})") from None
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise DataError(f"{path}: not a circatt train checkpoint (no {', '.join(sorted(missing))})")
    return state


class Diverged(Exception):
    """The loss blew up after every one of MAX_BACKTRACKS backtracks; one line for the user."""


def load_checkpoint_model(path: Path) -> tuple[GroupCDL, int]:
    """The model saved in a training checkpoint, and its step; raises DataError for a file that is not one."""
    state = read_checkpoint(path)
    try:
        model = GroupCDL(GroupCDLConfig.from_dict(state["config"]), init=False)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{path}: its model does not match its config ({err})") from None
    return model.eval(), state["count"]["step"]


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Constant for the first `hold` fraction of the steps, then a cosine decay to lr_min at the last step."""
    start = int(opts.hold * opts.steps)
    if step < start:
        return opts.lr
    t = min(1.0, (step - start) / max(1, opts.steps - start))
    return opts.lr_min + 0.5 * (opts.lr - opts.lr_min) * (1.0 + math.cos(math.pi * t))


def loss_weights(sigma: torch.Tensor, opts: TrainOptions) -> torch.Tensor | None:
    """Per-crop weights of the loss (None for plain MSE); "balanced" is 1 / (sigma + offset) scaled to
    mean 1 over the training sigmas (each half of the range weighted by its share of the crops), so that
    the loss keeps the scale of the MSE."""
    if opts.loss == "mse":
        return None
    lo, hi = opts.sigma_min / 255.0 + BALANCE_OFFSET, opts.sigma_max / 255.0 + BALANCE_OFFSET
    mid, share = (lo + hi) / 2, opts.sigma_low_share
    mean = share * _mean_inverse(lo, mid) + (1.0 - share) * _mean_inverse(mid, hi)
    return 1.0 / (mean * (sigma + BALANCE_OFFSET))


def _mean_inverse(lo: float, hi: float) -> float:
    """The mean of 1 / s for s uniform on [lo, hi] (lo > 0)."""
    return math.log(hi / lo) / (hi - lo) if hi > lo else 1.0 / lo


# What sets the scale of the epoch losses, and its value in checkpoints from before the option existed.
OBJECTIVE = {"loss": "mse", "sigma_min": None, "sigma_max": None, "sigma_low_share": "0.5"}


def _objective_changes(saved: dict, opts: TrainOptions) -> list[str]:
    """'name old -> new' for each option of OBJECTIVE that differs from the saved run's (saved as strings)."""
    changes = []
    for name, default in OBJECTIVE.items():
        old, new = saved.get(name, default), str(getattr(opts, name))
        if old is not None and old != new:
            changes.append(f"{name.replace('_', '-')} {old} -> {new}")
    return changes


def crop_loss(out: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, each crop's weighted by `weights` when given."""
    if weights is None:
        return (out - clean).square().mean()
    return ((out - clean).square().mean(dim=(1, 2, 3)) * weights).mean()


# ----- processes and devices ---------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """One process per device: DDP over NCCL (CUDA) or gloo (CPU) when started by torchrun, else a plain run."""
    chosen = resolve_device(device or "auto")[0]  # validates the option: CUDA asked for and absent is an error
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=chosen)
    want_cuda = chosen.type == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    target = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(target)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, target, owned)


def _all_sum(values: list[float], ctx: Dist) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj: object, ctx: Dist) -> list:
    if ctx.world == 1:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


# ----- state: capture, restore, checkpoint -------------------------------------------------------
def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Counters:
    """The counters that advance with the steps and are saved with them."""

    step: int = 0
    epoch_loss: float = 0.0
    best_epoch: float = math.inf
    lr_scale: float = 1.0
    backtracks: int = 0


class Trainer:
    """Holds the model, the optimiser, the sampler and the counters; one `step()` per optimiser step."""

    def __init__(self, opts: TrainOptions, ctx: Dist, console: Console) -> None:
        self.opts, self.ctx, self.console = opts, ctx, console
        torch.manual_seed(opts.seed)
        self.model = GroupCDL(opts.model_config()).to(ctx.device)
        self.net: nn.Module = self.model
        if ctx.world > 1 or dist.is_initialized():
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            no_refresh = len(self.model.config.update_layers()) == 1  # gamma is then unused
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=no_refresh)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=opts.lr, betas=(0.9, 0.999))
        images = load_images(opts.data, self.model.config.channels)
        sigmas = (opts.sigma_min / 255.0, opts.sigma_max / 255.0)
        self.seed = opts.seed * 1000 + ctx.rank
        self.sampler = CropSampler(images, opts.crop, sigmas, seed=self.seed, low_share=opts.sigma_low_share)
        self.count = Counters()
        self.anchor = self.capture()

    def capture(self) -> dict:
        """A deep copy of everything a backtrack restores (this process's part)."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "count": dataclasses.asdict(self.count),
            }
        )

    def restore(self, state: dict, sampler: dict | None) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if sampler is not None:
            self.sampler.load_state_dict(sampler)
        self.count = Counters(**state["count"])

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write RUN_DIR/last.pt atomically (rank 0; every rank's sampler state is gathered)."""
        current = self.capture()
        samplers = _gather(current["sampler"], self.ctx)
        if not self.ctx.main:
            return None
        path = self.opts.out / CHECKPOINT
        state = {
            **current,
            "samplers": samplers,
            "config": self.model.config.to_dict(),
            "options": {k: str(v) for k, v in dataclasses.asdict(self.opts).items()},
            "rng": rng_states(),
            "world": self.ctx.world,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> None:
        """Continue from a checkpoint; the sampler states carry over when the world size is unchanged."""
        state = read_checkpoint(path)
        if state["config"] != self.model.config.to_dict():
            raise DataError(f"{path} holds a different model config ({state['config']}); use another --out or --preset")
        same_world = state["world"] == self.ctx.world
        if not same_world and self.ctx.main:
            print_note(self.console, f"world size {state['world']} -> {self.ctx.world}: data streams reseeded")
        self.restore(state, state["samplers"][self.ctx.rank] if same_world else None)
        set_rng_states(state["rng"])
        changed = _objective_changes(state["options"], self.opts)
        if changed:  # the blow-up check compares like with like
            self.count.best_epoch = math.inf
            if self.ctx.main:
                print_note(self.console, f"{', '.join(changed)}: best epoch reset")
        self.anchor = self.capture()

    # ----- one step -----------------------------------------------------------------------------
    def step(self) -> tuple[float, float]:
        """Forward, backward, clip, and (when the global loss is finite) Adam + projections.
        Returns the global mean loss and the batch's mean PSNR."""
        noisy, clean, sigma = (t.to(self.ctx.device, non_blocking=True) for t in self.sampler.batch(self.opts.batch))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.count.step, self.opts) * self.count.lr_scale
        out = self.net(noisy, sigma)
        loss = crop_loss(out, clean, loss_weights(sigma, self.opts))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip)
        total_loss, total_psnr = _all_sum([loss.item(), psnr(out.detach(), clean).mean().item()], self.ctx)
        loss_value = total_loss / self.ctx.world
        if math.isfinite(loss_value):
            self.optimizer.step()
            self.model.project_()
            self.count.step += 1
            self.count.epoch_loss += loss_value
        return loss_value, total_psnr / self.ctx.world

    def end_of_epoch(self) -> bool:
        """At an epoch boundary: True (after backtracking) when the epoch's loss is NaN or a blow-up;
        otherwise the state becomes the anchor that a later backtrack returns to."""
        mean = self.count.epoch_loss / self.opts.epoch_steps
        self.count.epoch_loss = 0.0
        if math.isfinite(mean) and mean <= BLOWUP * self.count.best_epoch:
            self.count.best_epoch = min(self.count.best_epoch, mean)
            self.anchor = self.capture()
            return False
        self.backtrack()
        return True

    def backtrack(self) -> None:
        """Return to the last healthy epoch end (or the resumed state) with the learning rate x 0.9, and
        reseed the data streams: replaying the same batches would meet the same blow-up again."""
        scale, tries = self.count.lr_scale * 0.9, self.count.backtracks + 1
        if tries > MAX_BACKTRACKS:
            raise Diverged(f"training diverged {tries} times; giving up (lower --lr?); "
                           f"{self.opts.out / CHECKPOINT} holds the last saved state")
        self.restore(self.anchor, None)
        self.sampler.reseed(self.seed + 1_000_003 * tries)
        self.count.lr_scale, self.count.backtracks = scale, tries


# ----- the loop ----------------------------------------------------------------------------------
class JsonLog:
    """Append-only JSONL log (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: object) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


class StopSignal:
    """Turns SIGTERM into a flag checked after every step (restores the old handler on exit)."""

    def __init__(self) -> None:
        self.raised = False

    def __enter__(self) -> StopSignal:
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3e}  PSNR {task.fields[psnr]:.2f} dB  {task.fields[ips]:.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class Meter:
    """Smoothed loss / PSNR and the images/s since the first (warm-up) steps."""

    def __init__(self, images_per_step: int, warmup: int = 2) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self.loss = self.psnr = math.nan
        self.steps = 0
        self.start = time.perf_counter()

    def update(self, loss: float, psnr: float) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        if math.isfinite(self.loss):
            loss, psnr = 0.9 * self.loss + 0.1 * loss, 0.9 * self.psnr + 0.1 * psnr
        self.loss, self.psnr = loss, psnr

    @property
    def steps_per_s(self) -> float:
        timed = self.steps - self.warmup
        return timed / (time.perf_counter() - self.start) if timed > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.images_per_step


def _flags(trainer: Trainer, stop: StopSignal, started: float, last_save: float) -> tuple[bool, bool]:
    """(stop now, checkpoint now), agreed by every process."""
    opts, now = trainer.opts, time.monotonic()
    out_of_time = opts.max_minutes is not None and now - started > 60 * opts.max_minutes
    done = trainer.count.step >= (opts.stop_at or opts.steps)
    due = now - last_save > 60 * opts.checkpoint_minutes
    halt, save = _all_sum([float(stop.raised or out_of_time or done), float(due)], trainer.ctx)
    return halt > 0, save > 0


def run(opts: TrainOptions, console: Console | None = None) -> dict:
    """Train until `steps` (or stop_at / max_minutes / SIGTERM); checkpoint and return a summary."""
    ctx = setup_distributed(opts.device)
    console = console or make_console()
    try:
        return _run(opts, ctx, console)
    finally:
        if ctx.owned:
            dist.destroy_process_group()


def _run(opts: TrainOptions, ctx: Dist, console: Console) -> dict:
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainer = Trainer(opts, ctx, console)  # loads the data first: a run that cannot start leaves no folder
    if ctx.main:
        try:
            opts.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{opts.out}: cannot create the run folder ({err.strerror})") from None
    log = JsonLog(opts.out / LOG, ctx.main)
    checkpoint = opts.out / CHECKPOINT
    if opts.resume and checkpoint.exists():
        trainer.load(checkpoint)
    elif opts.resume and ctx.main:
        print_note(console, f"no {checkpoint} yet; starting a new run")
    first = trainer.count.step
    log.write("start", step=first, world=ctx.world, device=str(ctx.device), config=trainer.model.config.to_dict())
    meter = Meter(opts.batch * ctx.world)
    started = last_save = time.monotonic()
    with StopSignal() as stop, _progress(console, opts.progress and ctx.main) as bar:
        task = bar.add_task("train", total=opts.steps, completed=first, loss=math.nan, psnr=math.nan, ips=0.0)
        while True:
            halt, due = _flags(trainer, stop, started, last_save)
            if halt:
                break
            loss, psnr = trainer.step()
            if _diverged(trainer, loss):
                log.write("backtrack", step=trainer.count.step, loss=loss, lr_scale=trainer.count.lr_scale)
                if ctx.main:
                    console.print(f"[yellow]backtrack[/] to step {trainer.count.step}, lr x{trainer.count.lr_scale:.3f}")
                continue
            meter.update(loss, psnr)
            bar.update(task, completed=trainer.count.step, loss=meter.loss, psnr=meter.psnr, ips=meter.images_per_s)
            if trainer.count.step % opts.log_every == 0:
                _log_step(trainer, meter, log, console)
            if due:
                trainer.save()
                last_save = time.monotonic()
                log.write("checkpoint", step=trainer.count.step)
    trainer.save()
    summary = {
        "step": trainer.count.step,
        "steps_this_run": trainer.count.step - first,
        "loss": meter.loss,
        "psnr": meter.psnr,
        "images_per_s": meter.images_per_s,
        "steps_per_s": meter.steps_per_s,
        "world": ctx.world,
        "batch_per_process": opts.batch,
        "stopped_by_signal": stop.raised,
    }
    if ctx.device.type == "cuda":
        summary["max_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    log.write("end", **summary)
    if opts.val_dir is not None and ctx.main:
        summary["val_psnr"] = validate(trainer.model, opts, console)
        log.write("val", step=trainer.count.step, psnr=summary["val_psnr"])
    return summary


def _diverged(trainer: Trainer, loss: float) -> bool:
    """Backtrack (and say so) on a non-finite step, or at an epoch end whose loss blew up."""
    if not math.isfinite(loss):
        trainer.backtrack()
        return True
    return trainer.count.step % trainer.opts.epoch_steps == 0 and trainer.end_of_epoch()


def _log_step(trainer: Trainer, meter: Meter, log: JsonLog, console: Console) -> None:
    lr = trainer.optimizer.param_groups[0]["lr"]
    step = trainer.count.step
    log.write("train", step=step, loss=meter.loss, psnr=meter.psnr, lr=lr, images_per_s=meter.images_per_s)
    if trainer.ctx.main and not console.is_terminal:
        rate = f"{meter.images_per_s:.1f} img/s"
        console.print(f"step {step}  loss {meter.loss:.3e}  PSNR {meter.psnr:.2f} dB  {rate}  lr {lr:.2e}")


def validate(model: GroupCDL, opts: TrainOptions, console: Console) -> float:
    """Mean PSNR on the first val_images of val_dir at the middle of the training sigma range; an unreadable
    image is left out with a note (the run is done by then), and none readable gives NaN."""
    sigma = round((opts.sigma_min + opts.sigma_max) / 2)
    model.eval()
    errors: list[str] = []
    results = run_eval(model, [opts.val_dir], [sigma], limit=opts.val_images, on_error=errors.append)
    model.train()
    for error in errors:
        print_note(console, f"validation: {error} (left out)")
    return statistics.fmean(r.psnr for r in results) if results else math.nan


def train_command(
    data: Path = typer.Argument(..., help="Folder of training images, or a pack from scripts/pack_data.py."),
    out: Path = typer.Option(..., "--out", help="Run folder: last.pt checkpoint and log.jsonl."),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", help=f"Model preset: {' or '.join(PRESETS)}. gray trains on the 8-bit luma of colour images."),
    steps: int = typer.Option(20000, "--steps", min=1, help="Total steps (the schedule spans them)."),
    batch: int = typer.Option(12, "--batch", min=1, help="Crops per step per process."),
    crop: int = typer.Option(128, "--crop", min=2, help="Crop side in pixels."),
    sigma_min: float = typer.Option(0.0, "--sigma-min", min=0.0, help="Lowest training noise level (0-255)."),
    sigma_max: float = typer.Option(55.0, "--sigma-max", min=0.0, help="Highest training noise level (0-255)."),
    sigma_low_share: float = typer.Option(0.5, "--sigma-low-share", help="Share of the crops whose sigma lies in the lower half of the range, each half uniform (0.5: uniform)."),
    loss: str = typer.Option("mse", "--loss", help=f"mse (the authors'), or balanced: each crop's MSE / (sigma + {BALANCE_OFFSET * 255:g}/255), so the low noise levels weigh as much in dB as the high."),
    lr: float = typer.Option(5e-4, "--lr", min=0.0, help="Peak learning rate."),
    hold: float = typer.Option(0.67, "--hold", min=0.0, max=1.0, help="Fraction of steps at the peak lr before the decay."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt when it exists (without --resume, an OUT that holds one is refused)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)."),
    val_dir: Path | None = typer.Option(None, "--val-dir", help="Clean images for a PSNR check at the end."),
    checkpoint_minutes: float = typer.Option(3.0, "--checkpoint-minutes", min=0.0),
    max_minutes: float | None = typer.Option(None, "--max-minutes", min=0.0, help="Stop cleanly, with a checkpoint, after this."),
    stop_at: int | None = typer.Option(None, "--stop-at", min=1, hidden=True),
    log_every: int = typer.Option(20, "--log-every", min=1),
) -> None:
    """Train GroupCDL on random noisy crops (blind over a range of noise levels); resumable, DDP under torchrun."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"{preset!r} is not a preset; choose {' or '.join(PRESETS)}", param_hint="--preset")
    if not data.exists():
        raise typer.BadParameter(f"{data} does not exist", param_hint="DATA")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    if not resume and (out / CHECKPOINT).exists():  # a new run would overwrite it at its first checkpoint
        raise typer.BadParameter(f"{out / CHECKPOINT} exists: add --resume to continue that run, or give another --out", param_hint="--out")
    if val_dir is not None:
        check_image_folders([val_dir], "--val-dir")
    if sigma_max < sigma_min:
        raise typer.BadParameter("--sigma-max must be >= --sigma-min", param_hint="--sigma-max")
    if not 0.0 < sigma_low_share < 1.0:
        raise typer.BadParameter(f"{sigma_low_share:g} is not a share: give a number between 0 and 1 (exclusive)", param_hint="--sigma-low-share")
    if loss not in LOSSES:
        raise typer.BadParameter(f"{loss!r} is not a loss; choose {' or '.join(LOSSES)}", param_hint="--loss")
    opts = TrainOptions(
        data=data, out=out, preset=preset, steps=steps, batch=batch, crop=crop, sigma_min=sigma_min,
        sigma_max=sigma_max, sigma_low_share=sigma_low_share, loss=loss, lr=lr, hold=hold, seed=seed, resume=resume, device=device, val_dir=val_dir,
        checkpoint_minutes=checkpoint_minutes, max_minutes=max_minutes, stop_at=stop_at, log_every=log_every,
    )
    console = make_console()
    try:
        summary = run(opts, console)
    except (DataError, ImageError) as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    except Diverged as err:
        print_error(console, err)
        raise typer.Exit(1) from None
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"step {summary['step']} (+{summary['steps_this_run']} this run): {summary['images_per_s']:.1f} images/s, "
            f"{summary['steps_per_s']:.3f} steps/s over {summary['world']} process(es) "
            f"x batch {summary['batch_per_process']}"
        )
        if "val_psnr" in summary:
            console.print(f"validation PSNR: {summary['val_psnr']:.2f} dB")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
