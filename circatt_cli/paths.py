"""Which files a command reads and where it writes: inputs from files, folders and globs; output names."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import typer

from .imageio import FORMATS, is_supported

SUFFIX = "_denoised"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """An input file and its path relative to the folder it was found in (its name when given directly)."""

    path: Path
    relative: Path


def _folder_images(folder: Path, recursive: bool) -> list[Source]:
    found = folder.rglob("*") if recursive else folder.glob("*")
    images = sorted(p for p in found if p.is_file() and is_supported(p) and not p.stem.endswith(SUFFIX))
    return [Source(p, p.relative_to(folder)) for p in images]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in a folder, sorted by name, leaving out this tool's own outputs."""
    return [source.path for source in _folder_images(folder, recursive=False)]


def expand_inputs(arguments: list[str], recursive: bool) -> tuple[list[Source], list[str]]:
    """Files, folders (images inside; subfolders with `recursive`) and globs -> (sources, error lines).

    A path that does not exist is kept, so that reading it reports the error in its turn.
    """
    sources: list[Source] = []
    errors: list[str] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            found = _folder_images(path, recursive)
            sources += found
            if not found:
                errors.append(f"{path}: no images in this folder" + ("" if recursive else " (use --recursive for subfolders)"))
        elif not path.exists() and _GLOB_CHARS & set(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=recursive) if Path(m).is_file())
            images = [Source(m, Path(m.name)) for m in matches if is_supported(m)]
            sources += images
            if not images:
                kinds = ", ".join(sorted({m.suffix or "no extension" for m in matches}))
                errors.append(f"{arg}: matches no image file (only {kinds})" if matches else f"{arg}: no files match")
        else:
            sources.append(Source(path, Path(path.name)))
    return _unique(sources), errors


def _unique(sources: list[Source]) -> list[Source]:
    seen: set[Path] = set()
    out = []
    for s in sources:
        key = s.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def output_is_file(output: Path | None, count: int) -> bool:
    """Whether -o names one output file rather than a folder: a name with an extension that is not a folder.

    Raises ValueError where -o cannot work: a file for several inputs, a file type that cannot be
    written, or an existing file given as a folder or as one of its folders."""
    if output is None or output.is_dir():
        return False
    inside = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if inside is not None:
        raise ValueError(f"{inside} is a file, not a folder: -o {output} cannot be written inside it")
    if not output.suffix:
        if output.exists():
            raise ValueError(f"{output} exists and is not a folder; give a folder or an image file name")
        return False
    if not is_supported(output):
        raise ValueError(f"{output}: cannot write {output.suffix!r} files; use one of {', '.join(sorted(FORMATS))}")
    if count > 1:
        raise ValueError(f"{output} looks like a file but there are {count} inputs; give a folder")
    return True


def output_for(source: Source, output: Path | None, as_file: bool) -> Path:
    """`<stem>_denoised<ext>` beside the input, inside the -o folder (keeping subfolders), or -o itself."""
    if as_file and output is not None:
        return output
    name = f"{source.path.stem}{SUFFIX}{source.path.suffix}"
    if output is None:
        return source.path.with_name(name)
    return output / source.relative.with_name(name)


def check_result_file(path: Path | None, option: str) -> None:
    """A results file (--json, --csv, --plot, --export) that can be written, checked before the work rather
    than after it; a usage error naming the option otherwise. Leaves no file behind."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise typer.BadParameter(f"the folder of {path} does not exist", param_hint=option)
    try:
        existed = path.exists()
        with open(path, "a"):
            pass
    except IsADirectoryError:
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option) from None
    except OSError as err:
        raise typer.BadParameter(f"{path} cannot be written ({err.strerror})", param_hint=option) from None
    if not existed:
        path.unlink()
