"""`circatt denoise INPUT...`: denoise image files with GroupCDL, tiled when large."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import tiling
from .console import escape, make_console, print_error, print_note
from .devices import describe, resolve_device
from .ensemble import self_ensemble
from .imageio import ImageData, ImageError, read_image, write_image
from .model import PRESETS, preset_for
from .noise import add_noise, estimate_sigma
from .paths import Source, expand_inputs, output_for, output_is_file
from .weights import WeightsError, load_model


# A result whose RMS change from the input exceeds FACTOR x sigma + MARGIN (0-255 scale) is flagged:
# natural images change by 0.93-0.99 sigma, under 1 at sigma 0 (8 Set12 and BSD68 images, gray model);
# stripes the gray model amplifies at sigma 0 change by 30 to 300.
UNSTABLE_FACTOR, UNSTABLE_MARGIN = 1.5, 6.0


@dataclass
class Outcome:
    """One row of the summary table."""

    source: Path
    size: str = ""
    sigma: str = ""
    seconds: float = 0.0
    output: str = ""
    error: str | None = None
    warning: str | None = None
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)


class Models:
    """Loads each model once: `--model` if given, else the preset that takes the image's channels."""

    def __init__(self, forced: str | None, device: torch.device) -> None:
        self.forced = forced
        self.device = device
        self._loaded: dict[str, torch.nn.Module] = {}

    def spec_for(self, channels: int) -> str:
        """The model to use for an image with 1 or 3 channels."""
        return self.forced or preset_for(channels)

    def preload(self) -> None:
        """Load a forced --model now, so that a bad one is a usage error rather than one per image."""
        if self.forced is None:
            return
        try:
            self.get(1)
        except Exception as err:  # whatever the loader raises, the user gets one line
            raise typer.BadParameter(f"cannot load {self.forced!r}: {err}", param_hint="--model") from None

    def get(self, channels: int) -> torch.nn.Module:
        """The loaded model (in eval mode) for an image with this many channels."""
        spec = self.spec_for(channels)
        if spec not in self._loaded:
            self._loaded[spec] = load_model(spec, self.device)
        return self._loaded[spec]


def _adapt(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (1, C, h, w) as the model's input: a gray model takes each channel as an image (batch C),
    a colour model gets a gray image repeated three times."""
    want, have = model.config.channels, x.shape[1]
    if want == have:
        return x
    return x.transpose(0, 1) if want == 1 else x.expand(-1, want, -1, -1)


def _restore(out: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of `_adapt`: back to (1, channels, h, w)."""
    if out.shape[0] == 1 and out.shape[1] == channels:
        return out
    return out.transpose(0, 1) if out.shape[1] == 1 else out.mean(dim=1, keepdim=True)


def denoiser(
    model: torch.nn.Module, image: torch.Tensor, sigma: float, ensemble: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tile -> denoised tile function for `image` (1, C, H, W): channels adapted to the model, the noise
    level fixed, and the whole image's mean, so that tiles agree with each other; with `ensemble`, each
    tile is the mean over its 8 flips and quarter-turns (circatt_cli.ensemble)."""
    adapted = _adapt(model, image)
    s = torch.full((adapted.shape[0],), sigma, dtype=image.dtype, device=image.device)
    mean = adapted.mean(dim=(1, 2, 3), keepdim=True)  # unchanged by flips and turns

    def run(tile: torch.Tensor) -> torch.Tensor:
        return _restore(model(_adapt(model, tile), s, mean=mean), image.shape[1])

    return self_ensemble(run) if ensemble else run


def estimate(pixels: torch.Tensor) -> float:
    """The noise level of a (1, C, H, W) image on the [0, 1] scale."""
    return float(estimate_sigma(pixels)[0])


def noisy_pixels(pixels: np.ndarray, name: str, sigma255: float, seed: int | None) -> np.ndarray:
    """--add-noise on (H, W, C) pixels: noise.add_noise (eval's noise for this file name unless `seed`)."""
    return to_pixels(add_noise(to_tensor(pixels, torch.device("cpu")), name, sigma255, seed))


def to_tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, C) float array -> (1, C, H, W) tensor on `device`."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(device)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) tensor -> (H, W, C) float32 array."""
    return x[0].detach().float().cpu().numpy().transpose(1, 2, 0)


def tile_margin(model: torch.nn.Module) -> int:
    """Context pixels around each tile: the model's receptive field, rounded up to even."""
    rf = int(model.receptive_field)
    return rf + rf % 2


def bytes_per_pixel(model: torch.nn.Module) -> int:
    """Rough peak inference memory per image pixel, for choosing a tile size from free memory."""
    window = int(getattr(model.config, "window", 35))
    return max(tiling.DEFAULT_BYTES_PER_PIXEL, 3 * window * window)


@dataclass
class Job:
    """What the command does to every image: the options that do not vary per image."""

    models: Models
    device: torch.device
    sigma255: float | None
    tile: int | None
    noise255: float | None
    seed: int | None
    jpeg_quality: int
    overwrite: bool
    reference: ImageData | None
    ensemble: bool = False


def run_model(job: Job, image: ImageData, sigma: float, progress: Progress, tiles_task) -> np.ndarray:
    """Denoise the image's pixels with its model, tiled if large; returns (H, W, C) float pixels."""
    model = job.models.get(image.channels)
    margin = tile_margin(model)
    tile = job.tile or tiling.auto_tile(job.device, margin, bytes_per_pixel(model))
    x = to_tensor(image.pixels, job.device)

    def on_tile(done: int, total: int) -> None:
        progress.update(tiles_task, completed=done, total=total, visible=total > 1)

    def on_retry(smaller: int) -> None:
        progress.console.print(f"  [yellow]out of GPU memory: retrying with {smaller}-pixel tiles[/]")

    with torch.inference_mode():
        out, _ = tiling.run_with_retry(denoiser(model, x, sigma, job.ensemble), x, tile, margin, on_tile, on_retry)
    return to_pixels(out)


def unstable_change(noisy: np.ndarray, clean: np.ndarray, sigma: float) -> float | None:
    """The RMS change the model made (0-255 scale) when it is far beyond what removing noise of level
    `sigma` explains, else None. GroupCDL's unrolled iterations can amplify hard-edged patterns (stripes,
    text, line art) at low sigma instead of passing them through; natural images change by about sigma."""
    diff = (clean - noisy).ravel()
    change = float(np.sqrt(np.dot(diff, diff) / max(diff.size, 1))) * 255
    return change if change > UNSTABLE_FACTOR * sigma * 255 + UNSTABLE_MARGIN else None


def check_reference(reference: ImageData, image: ImageData) -> None:
    """The clean reference must match the image in size and channels."""
    if reference.size != image.size or reference.channels != image.channels:
        raise ImageError(
            f"--reference is {reference.size[1]}x{reference.size[0]}x{reference.channels} "
            f"but the image is {image.size[1]}x{image.size[0]}x{image.channels}"
        )


def scores(reference: ImageData, noisy: np.ndarray, clean: np.ndarray) -> dict[str, tuple[float, float]]:
    """{'input': (PSNR, SSIM), 'output': (PSNR, SSIM)} against the reference, pixels clipped to [0, 1]."""
    from .metrics import psnr, ssim

    ref = to_tensor(reference.pixels, torch.device("cpu")).double()
    out = {}
    for name, pixels in (("input", noisy), ("output", clean)):
        x = to_tensor(np.clip(pixels, 0, 1), torch.device("cpu")).double()
        out[name] = (float(psnr(x, ref)[0]), float(ssim(x, ref)[0]))
    return out


def process(job: Job, source: Source, target: Path, progress: Progress, tiles_task) -> Outcome:
    """Read, (add noise,) denoise and write one image; raises ImageError for a bad file."""
    start = time.perf_counter()
    image = read_image(source.path)
    outcome = Outcome(source.path, size=f"{image.size[1]}x{image.size[0]}x{image.channels}, {image.bits}-bit")
    if job.reference is not None:
        check_reference(job.reference, image)
    noisy = noisy_pixels(image.pixels, source.path.name, job.noise255, job.seed) if job.noise255 else image.pixels
    given = job.sigma255 is not None
    sigma = job.sigma255 / 255.0 if given else estimate(to_tensor(noisy, job.device))
    outcome.sigma = f"{sigma * 255:.1f}" + ("" if given else " (est.)")
    progress.console.print(f"{escape(str(source.path))}: sigma {sigma * 255:.2f} ({'given' if given else 'estimated'}, 0-255 scale)")
    clean = run_model(job, image.with_pixels(noisy), sigma, progress, tiles_task)
    change = unstable_change(noisy, clean, sigma)
    if change is not None:
        outcome.warning = f"changed by {change:.1f} RMS (0-255) at sigma {sigma * 255:.1f}"
        print_note(progress.console, f"{source.path}: the output differs from the input ({outcome.warning}); GroupCDL "
                                     "can amplify hard-edged patterns (stripes, text) at low noise levels: check it")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image(image.with_pixels(clean), target, jpeg_quality=job.jpeg_quality, overwrite=job.overwrite)
    if job.reference is not None:
        outcome.scores = scores(job.reference, noisy, clean)
    outcome.seconds, outcome.output = time.perf_counter() - start, str(target)
    return outcome


def plan_outputs(
    sources: list[Source], output: Path | None, as_file: bool, overwrite: bool
) -> tuple[list[tuple[Source, Path]], list[Outcome]]:
    """Pair each input with its output path; refuse outputs that are inputs, taken twice, or exist."""
    inputs = {s.path.resolve() for s in sources}
    planned: list[tuple[Source, Path]] = []
    refused: list[Outcome] = []
    taken: set[Path] = set()
    for source in sources:
        target = output_for(source, output, as_file)
        key = target.resolve()
        reason = None
        if key in inputs:
            reason = f"its output {target} is an input; refusing to overwrite it (choose another -o)"
        elif key in taken:
            reason = f"its output {target} is already the output of another input in this run"
        elif target.exists() and not overwrite:
            reason = f"its output {target} already exists (use --overwrite to replace it)"
        if reason:
            refused.append(Outcome(source.path, error=reason))
        else:
            taken.add(key)
            planned.append((source, target))
    return planned, refused


def summary_table(outcomes: list[Outcome], device: str) -> Table:
    """The table printed at the end: one row per input."""
    with_scores = any(o.scores for o in outcomes)
    table = Table(title="circatt denoise")
    for column in ("input", "size", "sigma", "device", "time", "output"):
        table.add_column(column, justify="right" if column in ("sigma", "time") else "left", overflow="fold")
    if with_scores:
        table.add_column("PSNR in -> out (dB)", justify="right")
        table.add_column("SSIM in -> out", justify="right")
    for o in outcomes:
        row = [escape(str(o.source)), o.size, o.sigma, device, f"{o.seconds:.2f} s" if not o.error else "",
               escape(o.output) if not o.error else f"[red]failed: {escape(o.error)}[/]"]
        if o.warning:
            row[-1] += f"\n[yellow]check: {escape(o.warning)}[/]"
        if with_scores:
            (pi, si), (po, so) = o.scores.get("input", (np.nan, np.nan)), o.scores.get("output", (np.nan, np.nan))
            row += [f"{pi:.2f} -> {po:.2f}", f"{si:.4f} -> {so:.4f}"]
        table.add_row(*row)
    return table


def make_progress(console: Console) -> Progress:
    """A progress display with a bar over images and one over the tiles of the current image."""
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )


def report_failure(console: Console, outcome: Outcome, err: BaseException, debug: bool) -> None:
    """One clear line for a failed image; the traceback too with --debug."""
    if isinstance(err, (ImageError, WeightsError)):  # the user's to fix: the message alone
        outcome.error = str(err).removeprefix(f"{outcome.source}: ")
    else:
        outcome.error = f"{type(err).__name__}: {err}"
    print_error(console, f"{outcome.source}: {outcome.error}")
    if debug:
        console.print_exception()


def run_all(job: Job, planned: list[tuple[Source, Path]], console: Console, debug: bool) -> list[Outcome]:
    """Process every planned image under a progress display; failures are reported and skipped."""
    outcomes = []
    with make_progress(console) as progress:
        images = progress.add_task("images", total=len(planned))
        tiles = progress.add_task("  tiles", total=1, visible=False)
        for source, target in planned:
            progress.update(images, description=f"images: {source.path.name}")
            progress.reset(tiles, total=1, visible=False)
            try:
                outcomes.append(process(job, source, target, progress, tiles))
            except Exception as err:  # one bad image must not stop the others
                outcome = Outcome(source.path)
                report_failure(progress.console, outcome, err, debug)
                outcomes.append(outcome)
            progress.advance(images)
    return outcomes


def load_reference(path: Path | None, count: int) -> ImageData | None:
    """The --reference image (one input only), or None; a bad file is a usage error."""
    if path is None:
        return None
    if count != 1:
        raise typer.BadParameter("--reference needs exactly one input image", param_hint="--reference")
    try:
        return read_image(path)
    except ImageError as err:
        raise typer.BadParameter(str(err), param_hint="--reference") from None


def check_output_option(output: Path | None, count: int) -> bool:
    """Whether -o names a file (see paths.output_is_file); an -o that cannot work is a usage error."""
    try:
        return output_is_file(output, count)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="-o/--output") from None


def denoise(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or globs (PNG, JPEG, TIFF, WebP, BMP).", metavar="INPUT", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (one input) or folder. Default: <stem>_denoised.<ext> beside each input.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also take images in subfolders of folder inputs.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files (inputs are never overwritten).")] = False,
    model: Annotated[Optional[str], typer.Option(help=f"{', '.join(PRESETS)}, or a weights file. Default: chosen from the image. A gray model denoises each channel of a colour image on its own, so the colours stay.")] = None,
    sigma: Annotated[Optional[float], typer.Option(min=0, max=255, help="Noise level on the 0-255 scale. Default: estimated per image.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. CUDA asked for and absent is an error.")] = "auto",
    tile: Annotated[Optional[int], typer.Option(min=tiling.MIN_TILE, help="Tile side in pixels. Default: chosen from free memory.")] = None,
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="Quality of JPEG outputs (WebP is written lossless).")] = 95,
    add_noise_sigma: Annotated[Optional[float], typer.Option("--add-noise", min=0, max=255, help="Demo: first add Gaussian noise of this sigma (0-255); without --seed, the noise `circatt eval` adds to a file of this name.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, max=2**32 - 1, help="Seed of --add-noise. Default: from the file name and sigma, as in eval.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Clean image: report PSNR/SSIM of the input and the output.")] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Average the model over the 8 flips and quarter-turns of the image: 8x the time, a little more PSNR.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Denoise images with GroupCDL; writes <stem>_denoised.<ext> beside each input by default."""
    console = make_console()
    if seed is not None and add_noise_sigma is None:
        raise typer.BadParameter("it seeds the noise of --add-noise, which was not given", param_hint="--seed")
    torch_device, device_line = resolve_device(device)
    sources, errors = expand_inputs(inputs, recursive)
    as_file = check_output_option(output, len(sources))
    job = Job(Models(model, torch_device), torch_device, sigma, tile, add_noise_sigma, seed, jpeg_quality, overwrite,
              load_reference(reference, len(sources)), ensemble)
    job.models.preload()
    console.print(device_line)
    for line in errors:
        print_error(console, line)
    planned, refused = plan_outputs(sources, output, as_file, overwrite)
    for o in refused:
        print_error(console, f"{o.source}: {o.error}")
    outcomes = run_all(job, planned, console, debug) + refused
    console.print(summary_table(outcomes, describe(torch_device)))
    if errors or any(o.error for o in outcomes):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("denoise", no_args_is_help=True)(denoise)
