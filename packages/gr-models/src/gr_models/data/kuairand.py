"""KuaiRand-1K (Gao et al., CIKM 2022) as a multi-task ranking log.

Published layout (the release archive ``KuaiRand-1K.tar.gz`` extracts to it)::

    KuaiRand-1K/data/log_standard_4_08_to_4_21_1k.csv     standard (recommended) exposures, weeks 1-2
    KuaiRand-1K/data/log_standard_4_22_to_5_08_1k.csv     standard exposures, weeks 3-4
    KuaiRand-1K/data/log_random_4_22_to_5_08_1k.csv       randomly exposed videos (used with include_random)
    KuaiRand-1K/data/user_features_1k.csv                 user attributes
    KuaiRand-1K/data/video_features_basic_1k.csv          video attributes (``tag``: comma-separated tag ids)

Per event: the labels ``is_click``, ``is_like``, ``is_follow``, ``is_comment``, ``is_forward``, ``is_hate``,
``long_view`` (0/1); the history action id is the bitmask of those seven signals (128 actions). Users carry their
id and categorical attributes; videos their tags as the item bag.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from os import PathLike
from pathlib import Path

import numpy as np

from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import DataFormatError, DatasetDownloadError, default_cache_dir
from gr_models.data.movielens_features import ItemBags, UserFeatures
from gr_models.data.ranking import RankingLog

logger = logging.getLogger(__name__)

KUAIRAND_URL = "https://zenodo.org/records/10439422/files/KuaiRand-1K.tar.gz"
STANDARD_LOGS = ("log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv")
RANDOM_LOG = "log_random_4_22_to_5_08_1k.csv"
USER_FILE = "user_features_1k.csv"
VIDEO_FILE = "video_features_basic_1k.csv"
SIGNALS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view")
USER_ATTRIBUTES = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)
_LOG_COLUMNS = ("user_id", "video_id", "time_ms", *SIGNALS)


def _data_folder(root: Path) -> Path | None:
    """The folder holding the logs: ``root`` itself, ``root/data`` or ``root/KuaiRand-1K/data``."""
    for folder in (root, root / "data", root / "KuaiRand-1K" / "data"):
        if (folder / STANDARD_LOGS[0]).is_file():
            return folder
    return None


def download_kuairand(cache_dir: PathLike | str | None = None, *, timeout: float = 120.0) -> Path:
    """Downloads and extracts the release into ``<cache>/KuaiRand-1K/`` and returns its data folder.

    The archive goes to a temporary file and is extracted into a staging folder renamed into place, so a failed
    or interrupted download never leaves a half dataset. The release publishes no checksum we could pin, so the
    extracted folder is checked for every file of the layout instead.
    """
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    found = _data_folder(cache)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    fd, part_name = tempfile.mkstemp(prefix=".KuaiRand-1K.", suffix=".tar.gz.part", dir=cache)
    os.close(fd)
    part = Path(part_name)
    staging = Path(tempfile.mkdtemp(prefix=".KuaiRand-1K.extract.", dir=cache))
    try:
        logger.info("downloading %s to %s", KUAIRAND_URL, cache)
        try:
            with urllib.request.urlopen(KUAIRAND_URL, timeout=timeout) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except urllib.error.HTTPError as e:
            raise DatasetDownloadError(f"could not download {KUAIRAND_URL}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise DatasetDownloadError(
                f"could not download {KUAIRAND_URL} ({getattr(e, 'reason', e)}): this machine appears to be "
                f"offline. Extract KuaiRand-1K.tar.gz by hand and pass data_dir=<folder holding KuaiRand-1K/> "
                f"(ranking trainer: --set data.data_dir=PATH), or put the extracted folder into {cache}"
            ) from e
        try:
            with tarfile.open(part, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataFormatError(f"{KUAIRAND_URL}: the downloaded archive is corrupt or truncated ({e})") from e
        data = _data_folder(staging)
        if data is None:
            raise DataFormatError(f"{KUAIRAND_URL}: the archive has no {STANDARD_LOGS[0]}; not KuaiRand-1K?")
        os.replace(data.parent, cache / "KuaiRand-1K")
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    found = _data_folder(cache)
    assert found is not None
    return found


def _read_csv(path: Path, columns: tuple[str, ...]) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (KuaiRand-1K layout: KuaiRand-1K/data/{path.name})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{path}: empty file, expected a header row")
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {missing}; header is {header}")
        idx = [header.index(c) for c in columns]
        out: dict[str, list[str]] = {c: [] for c in columns}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataFormatError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
            for c, i in zip(columns, idx, strict=True):
                out[c].append(row[i])
    return out


def _ints(path: Path, name: str, values: list[str]) -> np.ndarray:
    try:
        return np.array([int(float(v)) if "." in v else int(v) for v in values], dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not v.lstrip("-").replace(".", "", 1).isdigit())
        raise DataFormatError(f"{path}: column {name} holds a non-integer value {bad!r}") from None


def load_kuairand_ranking(
    data_dir: PathLike | str | None = None,
    *,
    download: bool = True,
    cache_dir: PathLike | str | None = None,
    include_random: bool = False,
) -> RankingLog:
    """KuaiRand-1K as a RankingLog (see the module docstring). ``data_dir``: the data folder, its parent, or the
    folder holding ``KuaiRand-1K/``; else the cache (downloaded there when allowed)."""
    folder = _data_folder(Path(data_dir).expanduser()) if data_dir is not None else None
    if folder is None:
        cache = Path(cache_dir or default_cache_dir()).expanduser()
        folder = _data_folder(cache)
        if folder is None:
            if not download:
                looked = f"{data_dir} and " if data_dir is not None else ""
                raise FileNotFoundError(
                    f"KuaiRand-1K: {STANDARD_LOGS[0]} not found in {looked}{cache} (looked in <dir>, <dir>/data, "
                    "<dir>/KuaiRand-1K/data) and download=False"
                )
            folder = download_kuairand(cache)
    files = [*STANDARD_LOGS, *((RANDOM_LOG,) if include_random else ())]
    cols: dict[str, list[np.ndarray]] = {c: [] for c in _LOG_COLUMNS}
    for name in files:
        path = folder / name
        table = _read_csv(path, _LOG_COLUMNS)
        for c in _LOG_COLUMNS:
            cols[c].append(_ints(path, c, table[c]))
    data = {c: np.concatenate(v) for c, v in cols.items()}
    for s in SIGNALS:
        if len(data[s]) and not np.isin(data[s], (0, 1)).all():
            raise DataFormatError(f"{folder}: column {s} must be 0/1")
    log = InteractionLog.from_raw(data["user_id"], data["video_id"], data["time_ms"] // 1000, None, "KuaiRand-1K")
    # Chronological per user; equal times keep file order (lexsort is stable).
    order = np.lexsort((data["time_ms"], log.users))
    users_sorted = log.users[order]
    seq_users, starts = np.unique(users_sorted, return_index=True)
    offsets = np.append(starts, len(order)).astype(np.int64)
    actions = np.zeros(len(order), dtype=np.int64)
    for bit, s in enumerate(SIGNALS):
        actions |= data[s][order] << bit
    return RankingLog(
        users=seq_users.astype(np.int64),
        offsets=offsets,
        items=log.items[order],
        timestamps=log.timestamps[order],
        actions=actions,
        labels={s: data[s][order].astype(np.float32) for s in SIGNALS},
        num_items=log.num_items,
        num_actions=1 << len(SIGNALS),
        user_features=_user_features(folder / USER_FILE, log),
        item_bags=_video_tags(folder / VIDEO_FILE, log),
        source=f"KuaiRand-1K ({folder})",
    )


def _user_features(path: Path, log: InteractionLog) -> UserFeatures:
    table = _read_csv(path, ("user_id", *USER_ATTRIBUTES))
    ids = _ints(path, "user_id", table["user_id"])
    row_of = {int(u): i for i, u in enumerate(ids)}
    missing = [int(u) for u in log.raw_user_ids if int(u) not in row_of]
    if missing:
        raise DataFormatError(f"{path}: no row for {len(missing)} user(s) of the logs, e.g. user_id {missing[0]}")
    rows = np.array([row_of[int(u)] for u in log.raw_user_ids], dtype=np.int64)
    columns, sizes = [np.arange(log.num_users, dtype=np.int64)], [log.num_users]
    for attr in USER_ATTRIBUTES:
        vocab, codes = np.unique(np.array(table[attr], dtype=object)[rows].astype(str), return_inverse=True)
        columns.append(codes.astype(np.int64))
        sizes.append(max(len(vocab), 1))
    return UserFeatures(("user_id", *USER_ATTRIBUTES), np.stack(columns, axis=1), tuple(sizes))


def _video_tags(path: Path, log: InteractionLog) -> ItemBags:
    table = _read_csv(path, ("video_id", "tag"))
    tags_of: dict[int, list[int]] = {}
    for vid, tag in zip(_ints(path, "video_id", table["video_id"]), table["tag"], strict=True):
        try:
            tags_of[int(vid)] = [int(t) for t in tag.split(",") if t.strip()]
        except ValueError:
            raise DataFormatError(f"{path}: video {vid} has a malformed tag list {tag!r}") from None
    raw = [tags_of.get(int(v), []) for v in log.raw_item_ids]  # videos without a row get an empty bag
    vocab = sorted({t for bag in raw for t in bag})
    index = {t: i for i, t in enumerate(vocab)}
    return ItemBags.from_lists("tag", [[index[t] for t in bag] for bag in raw], max(len(vocab), 1))
