"""MovieLens 100K / 1M / 20M ratings: local files first, else download + checksum + cache (online machines)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gr_models.data.interactions import InteractionLog


class DataFormatError(ValueError):
    """A dataset file does not have the documented format; the message names ``path:line``."""


@dataclass(frozen=True)
class MovieLensSpec:
    name: str
    url: str
    md5: str  # GroupLens publishes an MD5 sidecar for every archive (<url>.md5)
    ratings_file: str
    separator: str
    has_header: bool
    max_user_id: int  # documented id ranges (README of each release)
    max_item_id: int


MOVIELENS_DATASETS: dict[str, MovieLensSpec] = {
    "ml-100k": MovieLensSpec(
        "ml-100k",
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        "u.data",
        "\t",
        False,
        943,
        1682,
    ),
    "ml-1m": MovieLensSpec(
        "ml-1m",
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
        "ratings.dat",
        "::",
        False,
        6040,
        3952,
    ),
    "ml-20m": MovieLensSpec(
        "ml-20m",
        "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
        "cd245b17a1ae2cc31bb14903e1204af3",
        "ratings.csv",
        ",",
        True,
        138493,
        131262,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("GR_DATA_DIR") or Path.home() / ".cache" / "gr-stack" / "datasets")


def _spec(name: str) -> MovieLensSpec:
    if name not in MOVIELENS_DATASETS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; valid names: {sorted(MOVIELENS_DATASETS)}")
    return MOVIELENS_DATASETS[name]


def _candidates(spec: MovieLensSpec, folder: Path) -> list[Path]:
    return [folder / spec.ratings_file, folder / spec.name / spec.ratings_file]


def find_ratings_file(name: str, data_dir: str | os.PathLike[str] | None, cache_dir: Path | None = None) -> Path | None:
    """The ratings file in ``data_dir`` (or ``data_dir/<name>/``), else in the download cache; None if absent."""
    spec = _spec(name)
    folders = [Path(data_dir)] if data_dir is not None else []
    folders.append(cache_dir or default_cache_dir())
    for folder in folders:
        for path in _candidates(spec, folder):
            if path.is_file():
                return path
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_movielens(name: str, cache_dir: Path | None = None, *, timeout: float = 60.0) -> Path:
    """Downloads, verifies (MD5 from GroupLens) and extracts ``name`` into the cache; returns the ratings file."""
    spec = _spec(name)
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{spec.name}.zip"
    if not archive.is_file():
        tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".zip.part", dir=cache)
        try:
            with os.fdopen(tmp_fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out)
            os.replace(tmp_name, archive)
        except (urllib.error.URLError, OSError) as e:
            Path(tmp_name).unlink(missing_ok=True)
            raise RuntimeError(
                f"could not download {spec.url} ({e}); this machine appears to be offline. Put the extracted "
                f"{spec.name} files (the folder holding {spec.ratings_file}) on disk and pass its path as data_dir "
                f"(trainer: --set data.data_dir=PATH), or place {spec.name}.zip in {cache}"
            ) from e
    digest = _md5(archive)
    if digest != spec.md5:
        raise RuntimeError(
            f"checksum mismatch for {archive}: md5 {digest}, expected {spec.md5} (published by GroupLens); "
            "delete the file to download it again"
        )
    target = cache / spec.name
    if not (target / spec.ratings_file).is_file():
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.extract.", dir=cache))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
            extracted = staging / spec.name
            if not (extracted / spec.ratings_file).is_file():
                raise RuntimeError(f"{archive} does not contain {spec.name}/{spec.ratings_file}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(extracted, target)  # atomic: readers never see a half-extracted folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / spec.ratings_file


def _locate_bad_line(path: Path, spec: MovieLensSpec) -> DataFormatError:
    """Slow path, only after the fast parser failed: finds the first malformed line for the error message."""
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            if spec.has_header and lineno == 1:
                continue
            text = line.rstrip("\r\n")
            fields = text.split(spec.separator)
            if len(fields) != 4:
                return DataFormatError(
                    f"{path}:{lineno}: expected 4 fields separated by {spec.separator!r}, got {len(fields)}: {text!r}"
                )
            for what, value in zip(("user id", "item id", "timestamp"), (fields[0], fields[1], fields[3]), strict=True):
                if not value.strip().isdigit():
                    return DataFormatError(f"{path}:{lineno}: {what} must be a non-negative integer, got {value!r}")
            try:
                float(fields[2])
            except ValueError:
                return DataFormatError(f"{path}:{lineno}: rating must be a number, got {fields[2]!r}")
    return DataFormatError(f"{path}: could not be parsed as {spec.name} ratings")


def parse_ratings(path: Path, spec: MovieLensSpec) -> np.ndarray:
    """Parses a ratings file into a float64 ``[n, 4]`` array (user, item, rating, timestamp), validating it."""
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: file is empty")
    text_source: io.TextIOBase | Path = path
    delimiter = spec.separator
    if len(spec.separator) > 1:  # numpy's fast parser takes one-character delimiters only
        text_source = io.StringIO(path.read_text(encoding="latin-1").replace(spec.separator, "\t"))
        delimiter = "\t"
    try:
        data = np.loadtxt(
            text_source,
            delimiter=delimiter,
            dtype=np.float64,
            skiprows=1 if spec.has_header else 0,
            ndmin=2,
            encoding="latin-1",
        )
    except ValueError:
        raise _locate_bad_line(path, spec) from None
    if data.shape[0] == 0:
        raise DataFormatError(f"{path}: no ratings in file")
    if data.shape[1] != 4:
        raise _locate_bad_line(path, spec)
    header = 2 if spec.has_header else 1  # row r of `data` is line r + header of the file
    for col, what in ((0, "user id"), (1, "item id"), (3, "timestamp")):
        bad = (data[:, col] != np.floor(data[:, col])) | (data[:, col] < 0)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataFormatError(f"{path}:{r + header}: {what} must be a non-negative integer, got {data[r, col]!r}")
    for col, what, hi in ((0, "user id", spec.max_user_id), (1, "item id", spec.max_item_id)):
        bad = (data[:, col] < 1) | (data[:, col] > hi)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataFormatError(
                f"{path}:{r + header}: {what} {int(data[r, col])} out of range [1, {hi}] documented for {spec.name}"
            )
    return data


def _info_limits(path: Path, spec: MovieLensSpec) -> MovieLensSpec:
    """ml-100k ships ``u.info`` ("943 users", "1682 items"); when present its counts are the id limits."""
    info = path.parent / "u.info"
    if spec.name != "ml-100k" or not info.is_file():
        return spec
    counts: dict[str, int] = {}
    for line in info.read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            counts[parts[1]] = int(parts[0])
    return MovieLensSpec(
        spec.name,
        spec.url,
        spec.md5,
        spec.ratings_file,
        spec.separator,
        spec.has_header,
        counts.get("users", spec.max_user_id),
        counts.get("items", spec.max_item_id),
    )


def load_movielens(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> InteractionLog:
    """Loads MovieLens ``name`` ("ml-100k", "ml-1m", "ml-20m") as an InteractionLog.

    Looks for the ratings file in ``data_dir`` (the folder holding it, or its parent), then in the cache
    (``$GR_DATA_DIR`` or ``~/.cache/gr-stack/datasets``); downloads into the cache when allowed.
    """
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else None
    path = find_ratings_file(name, data_dir, cache)
    if path is None:
        if not download:
            looked = [str(p) for p in _candidates(spec, Path(data_dir))] if data_dir is not None else []
            looked += [str(p) for p in _candidates(spec, cache or default_cache_dir())]
            raise FileNotFoundError(
                f"{spec.name}: {spec.ratings_file} not found (looked in {', '.join(looked)}) and download=False; "
                "pass data_dir pointing at the extracted dataset"
            )
        path = download_movielens(name, cache)
    data = parse_ratings(path, _info_limits(path, spec))
    return InteractionLog.from_raw(
        raw_users=data[:, 0].astype(np.int64),
        raw_items=data[:, 1].astype(np.int64),
        timestamps=data[:, 3].astype(np.int64),
        ratings=data[:, 2].astype(np.float32),
        source=f"{spec.name} ({path})",
    )
