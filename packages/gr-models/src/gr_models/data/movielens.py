"""MovieLens 100K / 1M / 20M ratings as an InteractionLog: local files first, else a verified download into a cache.

Checksums: GroupLens publishes an MD5 sidecar next to every archive (``<url>.md5``); the digests below are those
published values, pinned here so that verification needs no network access beyond the archive itself. No SHA-256
is published and this code was written on a machine without internet access, so a SHA-256 could not be computed
from the real archives; ``MovieLensSpec`` names its algorithm so a SHA-256 can replace the MD5 without code changes.
MD5 is not collision resistant, but it is checked against a digest fixed in this file for an archive fetched over
HTTPS, which guards against truncated, corrupted or silently changed downloads: the purpose of this check.

Parsing is vectorised (``numpy.loadtxt`` into int64/float64 columns, then array-wide checks); only after that fails
does a line-by-line scan run, to name the first bad line as ``path:line``.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gr_models.data.interactions import InteractionLog

logger = logging.getLogger("gr_models.data")

PathLike = str | os.PathLike[str]


class DataFormatError(ValueError):
    """A dataset file breaks its documented format; the message reads ``path:line: what is wrong (text)``."""


class DatasetDownloadError(RuntimeError):
    """The archive could not be fetched (offline machine, unreachable or failing server)."""


class ChecksumError(RuntimeError):
    """An archive's digest differs from the published one."""


@dataclass(frozen=True)
class MovieLensSpec:
    name: str
    url: str
    checksum_algorithm: str  # a hashlib name
    checksum: str  # hex digest of the zip archive
    ratings_file: str  # path inside the extracted <name>/ folder
    separator: str
    header: str | None  # exact first line of the ratings file, if it has one
    rating_range: tuple[float, float]
    max_user_id: int | None  # documented id ranges (1..max); None where the release documents none
    max_item_id: int | None
    num_users: int | None  # documented totals of the full release (checked as a warning: subsets are fine)
    num_ratings: int | None


MOVIELENS_DATASETS: dict[str, MovieLensSpec] = {
    # ml-100k README / u.info: 943 users, 1682 items (ids 1..N), 100000 ratings of 1..5.
    "ml-100k": MovieLensSpec(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        checksum_algorithm="md5",
        checksum="0e33842e24a9c977be4e0107933c0723",
        ratings_file="u.data",
        separator="\t",
        header=None,
        rating_range=(1.0, 5.0),
        max_user_id=943,
        max_item_id=1682,
        num_users=943,
        num_ratings=100000,
    ),
    # ml-1m README: UserIDs 1..6040, MovieIDs 1..3952, 1,000,209 whole-star ratings.
    "ml-1m": MovieLensSpec(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        checksum_algorithm="md5",
        checksum="c4d9eecfca2ab87c1945afe126590906",
        ratings_file="ratings.dat",
        separator="::",
        header=None,
        rating_range=(1.0, 5.0),
        max_user_id=6040,
        max_item_id=3952,
        num_users=6040,
        num_ratings=1000209,
    ),
    # ml-20m README: 138493 users, 20000263 half-star ratings (0.5..5.0); movie ids are not documented as a range.
    "ml-20m": MovieLensSpec(
        name="ml-20m",
        url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
        checksum_algorithm="md5",
        checksum="cd245b17a1ae2cc31bb14903e1204af3",
        ratings_file="ratings.csv",
        separator=",",
        header="userId,movieId,rating,timestamp",
        rating_range=(0.5, 5.0),
        max_user_id=None,
        max_item_id=None,
        num_users=138493,
        num_ratings=20000263,
    ),
}

_ROW_DTYPE = np.dtype([("user", np.int64), ("item", np.int64), ("rating", np.float64), ("timestamp", np.int64)])
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
_BLOCK_BYTES = 1 << 23  # parse unit: bounds the line-by-line scan after an error to one block


def get_spec(name: str) -> MovieLensSpec:
    if name not in MOVIELENS_DATASETS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; valid names: {', '.join(MOVIELENS_DATASETS)}")
    return MOVIELENS_DATASETS[name]


def default_cache_dir() -> Path:
    """``$GR_DATA_DIR`` if set, else ``~/.cache/gr-stack/datasets``."""
    env = os.environ.get("GR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gr-stack" / "datasets"


def _candidates(spec: MovieLensSpec, data_dir: Path) -> list[Path]:
    return [data_dir / spec.ratings_file, data_dir / spec.name / spec.ratings_file]


def _in_data_dir(spec: MovieLensSpec, data_dir: PathLike) -> Path | None:
    root = Path(data_dir).expanduser()
    if root.is_file() and root.name == spec.ratings_file:
        return root
    return next((p for p in _candidates(spec, root) if p.is_file()), None)


def find_ratings_file(name: str, data_dir: PathLike | None = None, cache_dir: PathLike | None = None) -> Path | None:
    """The ratings file in ``data_dir`` (itself the file, the folder holding it, or that folder's parent), else in
    the cache's ``<name>/`` folder; None when absent."""
    spec = get_spec(name)
    found = _in_data_dir(spec, data_dir) if data_dir is not None else None
    cached = Path(cache_dir or default_cache_dir()).expanduser() / spec.name / spec.ratings_file
    return found or (cached if cached.is_file() else None)


# ----------------------------------------------------------------------------------------------- download
def _download(url: str, dest: Path, timeout: float) -> None:
    """Streams ``url`` into ``dest`` (module-level so tests can replace it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, spec: MovieLensSpec) -> None:
    digest = file_digest(path, spec.checksum_algorithm)
    if digest != spec.checksum:
        origin = f"published by GroupLens at {spec.url}.md5" if spec.checksum_algorithm == "md5" else "pinned"
        raise ChecksumError(
            f"checksum mismatch for {path}: {spec.checksum_algorithm} {digest}, expected {spec.checksum} "
            f"({origin}); the archive is corrupt, truncated or not {spec.name}"
        )


def _offline_message(spec: MovieLensSpec, cache: Path, reason: object) -> str:
    return (
        f"could not download {spec.url} ({reason}): this machine appears to be offline or cannot reach "
        f"files.grouplens.org. Use local files instead: pass data_dir=<folder holding {spec.ratings_file}, or its "
        f"parent holding {spec.name}/> to load_movielens (retrieval trainer: --set data.data_dir=PATH), or copy "
        f"{spec.name}.zip into {cache} where it is verified and extracted"
    )


def download_movielens(name: str, cache_dir: PathLike | None = None, *, timeout: float = 60.0) -> Path:
    """Makes ``<cache>/<name>/`` hold the verified, extracted release and returns its ratings file.

    An archive already in the cache (an earlier run, or copied there by hand) is verified and used; otherwise it is
    downloaded to a temporary file that only takes the archive's name after its checksum matched. Extraction goes
    to a temporary folder renamed into place, so no reader ever sees a half-extracted dataset.
    """
    spec = get_spec(name)
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    target = cache / spec.name
    if (target / spec.ratings_file).is_file():
        return target / spec.ratings_file
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{spec.name}.zip"
    if archive.is_file():
        try:
            verify_checksum(archive, spec)
        except ChecksumError as e:
            raise ChecksumError(f"{e}; delete {archive} to download it again") from None
    else:
        logger.info("downloading %s to %s", spec.url, archive)
        fd, part_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".zip.part", dir=cache)
        os.close(fd)
        part = Path(part_name)
        try:
            try:
                _download(spec.url, part, timeout)
            except urllib.error.HTTPError as e:  # the server answered: not an offline machine
                raise DatasetDownloadError(f"could not download {spec.url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise DatasetDownloadError(_offline_message(spec, cache, getattr(e, "reason", e))) from e
            verify_checksum(part, spec)
            os.replace(part, archive)
        finally:
            part.unlink(missing_ok=True)
    _extract(archive, spec, target)
    return target / spec.ratings_file


def _extract(archive: Path, spec: MovieLensSpec, target: Path) -> None:
    member = f"{spec.name}/{spec.ratings_file}"
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.extract.", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                if member not in zf.namelist():
                    raise DataFormatError(f"{archive}: the archive has no {member}")
                zf.extractall(staging)  # zipfile strips absolute paths and '..' from member names
        except zipfile.BadZipFile as e:
            raise DataFormatError(f"{archive}: not a valid zip archive ({e})") from None
        try:
            os.replace(staging / spec.name, target)
        except OSError:
            if not (target / spec.ratings_file).is_file():  # else a concurrent run extracted it first: fine
                raise DataFormatError(
                    f"{target} exists but holds no {spec.ratings_file}; remove that folder and retry"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class _Limits:
    max_user_id: int | None
    max_item_id: int | None
    rating_range: tuple[float, float]
    id_source: str  # where the id limits come from, for messages


def _limits(spec: MovieLensSpec, ratings_path: Path) -> _Limits:
    """The documented id limits; for ml-100k, ``u.info`` next to ``u.data`` ("943 users", "1682 items") wins."""
    limits = _Limits(spec.max_user_id, spec.max_item_id, spec.rating_range, f"documented for {spec.name}")
    info = ratings_path.parent / "u.info"
    if spec.name != "ml-100k" or not info.is_file():
        return limits
    counts: dict[str, int] = {}
    for lineno, line in enumerate(info.read_text(encoding="latin-1").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataFormatError(f"{info}:{lineno}: expected '<count> <what>' such as '943 users' ({line!r})")
        counts[parts[1]] = int(parts[0])
    missing = [key for key in ("users", "items") if key not in counts]
    if missing:
        raise DataFormatError(f"{info}: no '<count> {missing[0]}' line")
    return replace(limits, max_user_id=counts["users"], max_item_id=counts["items"], id_source=f"per {info}")


def _value_problem(user: int, item: int, rating: float, timestamp: int, limits: _Limits) -> str | None:
    """What is wrong with one parsed row, or None: shared by the vectorised and the line-by-line checks."""
    for what, value, hi in (("user id", user, limits.max_user_id), ("item id", item, limits.max_item_id)):
        if value < 1:
            return f"{what} must be a positive integer, got {value}"
        if hi is not None and value > hi:
            return f"{what} {value} is out of range: ids run 1..{hi} ({limits.id_source})"
    lo, hi_rating = limits.rating_range
    if not lo <= rating <= hi_rating:  # also rejects NaN
        return f"rating {rating} is outside [{lo:g}, {hi_rating:g}]"
    if timestamp < 0:
        return f"timestamp must be non-negative unix seconds, got {timestamp}"
    return None


def _line_problem(text: str, spec: MovieLensSpec, limits: _Limits) -> str | None:
    if not text.strip():
        return "empty line (expected one rating per line)"
    fields = text.split(spec.separator)
    if len(fields) != 4:
        return f"expected 4 fields separated by {spec.separator!r}, got {len(fields)}"
    values: list[int] = []
    for what, field in (("user id", fields[0]), ("item id", fields[1]), ("timestamp", fields[3])):
        if not _INTEGER.fullmatch(field):
            return f"{what} is not an integer: {field.strip()!r}"
        values.append(int(field))
        if not -(2**63) <= values[-1] < 2**63:
            return f"{what} {values[-1]} does not fit in int64"
    try:
        rating = float(fields[2])
    except ValueError:
        return f"rating is not a number: {fields[2].strip()!r}"
    return _value_problem(values[0], values[1], rating, values[2], limits)


def _scan_block(path: Path, block: bytes, first_lineno: int, spec: MovieLensSpec, limits: _Limits) -> str | None:
    """Slow path, run only on a block the vectorised parse rejected: ``path:line: problem (text)`` of its first bad
    line, or None."""
    lines = block.decode("latin-1").split("\n")
    if block.endswith(b"\n"):
        lines.pop()
    for lineno, line in enumerate(lines, start=first_lineno):
        text = line.rstrip("\r")
        problem = _line_problem(text, spec, limits)
        if problem is not None:
            return f"{path}:{lineno}: {problem} ({text!r})"
    return None


def _blocks(f: io.BufferedReader, first_lineno: int) -> Iterator[tuple[int, bytes]]:
    """The rest of ``f`` in blocks of whole lines, each with the 1-based number of its first line."""
    rest = b""
    while chunk := f.read(_BLOCK_BYTES):
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        block, rest = data[:cut], data[cut:]
        if block:
            yield first_lineno, block
            first_lineno += block.count(b"\n")
    if rest:
        yield first_lineno, rest  # last line without a trailing newline


def _parse_block(path: Path, block: bytes, first_lineno: int, spec: MovieLensSpec, limits: _Limits) -> np.ndarray:
    num_lines = block.count(b"\n") + (not block.endswith(b"\n"))
    text, delimiter = block, spec.separator
    if len(delimiter) > 1:  # loadtxt takes one-character delimiters: map '::' to a tab, which no valid line holds
        text = None if b"\t" in block else block.replace(delimiter.encode(), b"\t")
        delimiter = "\t"
    rows = None
    if text is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": a blank block, see below
                rows = np.loadtxt(
                    io.BytesIO(text),
                    dtype=_ROW_DTYPE,
                    delimiter=delimiter,
                    comments=None,  # a '#' line is malformed, not a comment
                    ndmin=1,
                    encoding="latin-1",
                )
        except ValueError:
            rows = None
    if rows is None or len(rows) != num_lines:  # loadtxt skips blank lines silently; we do not
        problem = _scan_block(path, block, first_lineno, spec, limits)
        raise DataFormatError(problem or f"{path}:{first_lineno}: lines from here could not be parsed as {spec.name}")

    lo, hi = limits.rating_range
    bad = (rows["user"] < 1) | (rows["item"] < 1) | (rows["timestamp"] < 0)
    bad |= ~((rows["rating"] >= lo) & (rows["rating"] <= hi))  # written this way round to catch NaN
    if limits.max_user_id is not None:
        bad |= rows["user"] > limits.max_user_id
    if limits.max_item_id is not None:
        bad |= rows["item"] > limits.max_item_id
    if bad.any():
        r = int(np.argmax(bad))  # every line is a row (checked above), so row r is line first_lineno + r
        user, item, rating, timestamp = rows[r].tolist()
        text = block.decode("latin-1").split("\n")[r].rstrip("\r")
        raise DataFormatError(
            f"{path}:{first_lineno + r}: {_value_problem(user, item, rating, timestamp, limits)} ({text!r})"
        )
    return rows


def parse_ratings(path: PathLike, spec: MovieLensSpec) -> np.ndarray:
    """Reads a ratings file into a structured array (user, item, rating, timestamp) with every row validated.

    Blocks of ~8 MB are parsed by ``numpy.loadtxt`` and checked array-wide; a block that fails is scanned line by
    line to name its first bad line, so an error costs at most one block of slow parsing. Raises DataFormatError
    naming ``path:line`` (or the file, when it is empty).
    """
    path = Path(path)
    limits = _limits(spec, path)
    parts = []
    with open(path, "rb") as f:
        first_line = f.readline()
        if not first_line:
            raise DataFormatError(f"{path}: file is empty (expected {spec.name} ratings)")
        first_lineno = 1
        if spec.header is not None:
            text = first_line.decode("latin-1").rstrip("\r\n")
            if text.strip() != spec.header:
                raise DataFormatError(f"{path}:1: expected the header {spec.header!r} ({text!r})")
            first_lineno = 2
        else:
            f.seek(0)
        for lineno, block in _blocks(f, first_lineno):
            parts.append(_parse_block(path, block, lineno, spec, limits))
    if not parts:
        raise DataFormatError(f"{path}: no ratings after the header")
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------- entry point
def load_movielens(
    name: str,
    data_dir: PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: PathLike | None = None,
) -> InteractionLog:
    """Loads MovieLens ``name`` ("ml-100k", "ml-1m" or "ml-20m") as an InteractionLog in file order.

    Looks in ``data_dir`` (the ratings file itself, the folder holding it, or its parent holding ``<name>/``), then
    in ``<cache_dir>/<name>/`` (default cache: ``$GR_DATA_DIR`` or ``~/.cache/gr-stack/datasets``); downloads into
    the cache when allowed. Users and items are re-indexed in sorted raw-id order (MovieLens item 1 -> index 0).
    """
    spec = get_spec(name)
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    path = _in_data_dir(spec, data_dir) if data_dir is not None else None
    if path is None:
        cached = cache / spec.name / spec.ratings_file
        if not cached.is_file() and not download:
            looked = [*_candidates(spec, Path(data_dir).expanduser()), cached] if data_dir is not None else [cached]
            raise FileNotFoundError(
                f"{spec.name}: {spec.ratings_file} not found (looked in {', '.join(map(str, looked))}) and "
                f"download=False; pass data_dir pointing at the extracted {spec.name} folder, or allow the download"
            )
        if data_dir is not None:  # the caller named a folder: say that another copy is used
            logger.warning("%s: no %s in %s; using the cache %s", spec.name, spec.ratings_file, data_dir, cache)
        path = cached if cached.is_file() else download_movielens(name, cache)
    rows = parse_ratings(path, spec)
    log = InteractionLog.from_raw(
        raw_users=rows["user"],
        raw_items=rows["item"],
        timestamps=rows["timestamp"],
        ratings=rows["rating"].astype(np.float32),
        source=f"{spec.name} ({path})",
    )
    logger.info("%s: %d ratings, %d users, %d items from %s", spec.name, len(log), log.num_users, log.num_items, path)
    if (spec.num_ratings, spec.num_users) != (len(log), log.num_users):
        logger.warning(
            "%s: %s holds %d ratings of %d users; the full release has %d of %d (a subset or modified copy?)",
            spec.name,
            path,
            len(log),
            log.num_users,
            spec.num_ratings,
            spec.num_users,
        )
    return log
