"""MovieLens loading: the real ml-100k files, the three file formats, every malformed-input path, the cache/download
logic (offline, checksum, atomic extraction) on small files written to tmp_path."""

from __future__ import annotations

import hashlib
import io
import logging
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gr_models.data import build_user_sequences
from gr_models.data import movielens as ml
from gr_models.data.movielens import (
    ChecksumError,
    DataFormatError,
    DatasetDownloadError,
    default_cache_dir,
    load_movielens,
)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ real data
def test_real_ml100k(ml100k_dir: Path) -> None:
    log = load_movielens("ml-100k", ml100k_dir, download=False)
    assert (len(log), log.num_users, log.num_items) == (100000, 943, 1682)
    assert log.raw_item_ids[0] == 1 and log.raw_item_ids[-1] == 1682
    assert log.raw_user_ids[0] == 1 and log.raw_user_ids[-1] == 943
    # file order kept: the first line of u.data is "196	242	3	881250949"
    assert (log.raw_user_ids[log.users[0]], log.raw_item_ids[log.items[0]], log.timestamps[0]) == (196, 242, 881250949)
    assert log.ratings is not None and set(np.unique(log.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert "ml-100k" in log.source and "u.data" in log.source

    seqs = build_user_sequences(log)
    assert len(seqs) == 943 and seqs.num_dropped_users == 0  # every ml-100k user rated >= 20 movies
    assert seqs.lengths.min() >= 20 and seqs.lengths.sum() == 100000
    within_user = np.ones(len(seqs.items) - 1, dtype=bool)
    within_user[seqs.offsets[1:-1] - 1] = False  # pairs that straddle two users
    assert (np.diff(seqs.timestamps)[within_user] >= 0).all()  # every sequence is chronological

    # the parent folder (data_dir/<name>/u.data) and the file itself work too
    assert len(load_movielens("ml-100k", ml100k_dir.parent, download=False)) == 100000
    assert len(load_movielens("ml-100k", ml100k_dir / "u.data", download=False)) == 100000


def test_ties_keep_file_order(tmp_path: Path) -> None:
    # user 1: items 5, 3, 4 share t=100, item 9 is older; the stable sort must keep 5, 3, 4 as in the file
    _write(tmp_path, "u.data", "1\t5\t3\t100\n2\t7\t3\t100\n1\t3\t4\t100\n1\t9\t2\t50\n1\t4\t5\t100\n")
    log = load_movielens("ml-100k", tmp_path, download=False)
    seqs = build_user_sequences(log, min_interactions=1)
    assert log.raw_item_ids[seqs.items_of(0)].tolist() == [9, 5, 3, 4]
    assert seqs.timestamps_of(0).tolist() == [50, 100, 100, 100]


def test_ml1m_and_ml20m_formats(tmp_path: Path) -> None:
    _write(tmp_path / "ml-1m", "ratings.dat", "1::1193::5::978300760\r\n2::661::3::978302109\r\n")
    log = load_movielens("ml-1m", tmp_path, download=False)
    assert log.raw_item_ids.tolist() == [661, 1193] and log.timestamps.tolist() == [978300760, 978302109]
    assert log.ratings is not None and log.ratings.dtype == np.float32

    _write(tmp_path / "ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,0.5,1\n")
    log = load_movielens("ml-20m", tmp_path, download=False)
    assert log.ratings is not None and log.ratings.tolist() == [3.5, 0.5]
    assert log.raw_item_ids.tolist() == [2, 29] and log.num_users == 1


def test_large_csv_is_parsed_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    cols = (
        rng.integers(1, 5000, n),
        rng.integers(1, 200_000, n),
        rng.integers(1, 11, n) / 2,
        rng.integers(800_000_000, 1_500_000_000, n),
    )
    body = "\n".join(f"{u},{i},{r:.1f},{t}" for u, i, r, t in zip(*(c.tolist() for c in cols), strict=True))
    _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n" + body + "\n")
    log = load_movielens("ml-20m", tmp_path, download=False)
    assert np.array_equal(log.raw_user_ids[log.users], cols[0]) and np.array_equal(log.raw_item_ids[log.items], cols[1])
    assert np.array_equal(log.ratings, cols[2].astype(np.float32)) and np.array_equal(log.timestamps, cols[3])


# ------------------------------------------------------------------------------------------ malformed files
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1\t2\t3\t100\n1\t2\t3\n", r"u\.data:2: expected 4 fields separated by '\\t', got 3 \('1\\t2\\t3'\)"),
        ("1\t2\t3\t100\n1\t2\t3\t100\t7\n", r"u\.data:2: expected 4 fields .* got 5"),
        ("1\t2\t3\t100\nx\t2\t3\t100\n", r"u\.data:2: user id is not an integer: 'x'"),
        ("1\t2\t3\t100\n1\t2.5\t3\t100\n", r"u\.data:2: item id is not an integer: '2\.5'"),
        ("1\t2\tbad\t100\n", r"u\.data:1: rating is not a number: 'bad'"),
        ("1\t2\t3\tnoon\n", r"u\.data:1: timestamp is not an integer: 'noon'"),
        ("1\t2\t3\t100\n0\t2\t3\t100\n", r"u\.data:2: user id must be a positive integer, got 0"),
        ("1\t-4\t3\t100\n", r"u\.data:1: item id must be a positive integer, got -4"),
        ("1\t1683\t3\t100\n", r"u\.data:1: item id 1683 is out of range: ids run 1\.\.1682 \(documented for ml-100k\)"),
        ("1\t2\t9\t100\n", r"u\.data:1: rating 9\.0 is outside \[1, 5\]"),
        ("1\t2\tnan\t100\n", r"u\.data:1: rating nan is outside"),
        ("1\t2\t3\t-5\n", r"u\.data:1: timestamp must be non-negative"),
        ("1\t2\t3\t100\n\n1\t3\t3\t100\n", r"u\.data:2: empty line"),
        ("# comment\n1\t2\t3\t100\n", r"u\.data:1: expected 4 fields"),
        (
            "1\t2\t3\t100\n1\t2\t3\t100\n1\t2\t3\t99999999999999999999\n",
            r"u\.data:3: timestamp .* does not fit in int64",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    _write(tmp_path, "u.data", text)
    with pytest.raises(DataFormatError, match=match):
        load_movielens("ml-100k", tmp_path, download=False)


def test_empty_file_and_header_problems(tmp_path: Path) -> None:
    _write(tmp_path, "u.data", "")
    with pytest.raises(DataFormatError, match=r"u\.data: file is empty"):
        load_movielens("ml-100k", tmp_path, download=False)
    _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv: no ratings after the header"):
        load_movielens("ml-20m", tmp_path, download=False)
    _write(tmp_path, "ratings.csv", "1,2,3.5,1112486027\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: expected the header 'userId,movieId,rating,timestamp'"):
        load_movielens("ml-20m", tmp_path, download=False)
    _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1\n1,2,3.5,1,\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:3: expected 4 fields separated by ','"):
        load_movielens("ml-20m", tmp_path, download=False)


def test_ml1m_separator_errors(tmp_path: Path) -> None:
    _write(tmp_path, "ratings.dat", "1::1193::5::978300760\n2::661::3\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: expected 4 fields separated by '::', got 3"):
        load_movielens("ml-1m", tmp_path, download=False)
    _write(tmp_path, "ratings.dat", "1::1193::5::978300760\n2\t6::661::3::5\n")  # a tab must not pass for '::'
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: user id is not an integer"):
        load_movielens("ml-1m", tmp_path, download=False)
    _write(tmp_path, "ratings.dat", "6041::1::5::978300760\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:1: user id 6041 is out of range: ids run 1\.\.6040"):
        load_movielens("ml-1m", tmp_path, download=False)


def test_u_info_limits_ids(tmp_path: Path) -> None:
    _write(tmp_path, "u.info", "3 users\n10 items\n3 ratings\n")
    _write(tmp_path, "u.data", "1\t2\t3\t100\n2\t11\t3\t100\n")
    with pytest.raises(
        DataFormatError, match=r"u\.data:2: item id 11 is out of range: ids run 1\.\.10 \(per .*u\.info\)"
    ):
        load_movielens("ml-100k", tmp_path, download=False)
    _write(tmp_path, "u.data", "1\t2\t3\t100\n4\t1\t3\t100\n")
    with pytest.raises(DataFormatError, match=r"u\.data:2: user id 4 is out of range: ids run 1\.\.3"):
        load_movielens("ml-100k", tmp_path, download=False)
    _write(tmp_path, "u.info", "3 users\nten items\n")
    with pytest.raises(DataFormatError, match=r"u\.info:2: expected '<count> <what>'"):
        load_movielens("ml-100k", tmp_path, download=False)


# ------------------------------------------------------------------------------------------ locating files
def test_missing_files_and_unknown_name(tmp_path: Path) -> None:
    looked = r"looked in .*nowhere/u\.data, .*nowhere/ml-100k/u\.data, .*cache/ml-100k/u\.data"
    with pytest.raises(FileNotFoundError, match=rf"u\.data not found \({looked}\) and download=False; pass data_dir"):
        load_movielens("ml-100k", tmp_path / "nowhere", download=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"unknown MovieLens dataset 'ml-7'; valid names: ml-100k, ml-1m, ml-20m"):
        load_movielens("ml-7", tmp_path)


def test_cache_dir_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GR_DATA_DIR", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "gr-stack" / "datasets"
    monkeypatch.setenv("GR_DATA_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    _write(tmp_path / "ml-100k", "u.data", "1\t2\t3\t100\n")
    assert len(load_movielens("ml-100k", download=False)) == 1  # found in $GR_DATA_DIR/ml-100k/


# ------------------------------------------------------------------------------------------ download + checksum
def _zip_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


FAKE_ML100K = _zip_bytes({"ml-100k/u.data": "1\t2\t3\t100\n2\t3\t4\t200\n", "ml-100k/README": "fake"})


def _with_spec(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    spec = ml.MOVIELENS_DATASETS["ml-100k"]
    monkeypatch.setitem(ml.MOVIELENS_DATASETS, "ml-100k", replace(spec, **changes))  # type: ignore[arg-type]


def test_offline_download_says_how_to_use_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_spec(monkeypatch, url="http://127.0.0.1:9/ml-100k.zip")  # discard port: connection refused
    with pytest.raises(DatasetDownloadError, match=r"appears to be offline.*data_dir=.*--set data\.data_dir=PATH"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial archive left behind


def test_http_error_is_not_called_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(url: str, dest: Path, timeout: float) -> None:
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]

    monkeypatch.setattr(ml, "_download", fail)
    with pytest.raises(DatasetDownloadError, match=r"HTTP 404 Not Found"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)


def test_download_verifies_then_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, dest: Path, timeout: float) -> None:
        calls.append(url)
        dest.write_bytes(FAKE_ML100K)

    monkeypatch.setattr(ml, "_download", fake_download)
    # published checksum of the real archive: the fake one is rejected and not kept
    with pytest.raises(ChecksumError, match=r"checksum mismatch .*md5 .* expected 0e33842e24a9c977be4e0107933c0723"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    _with_spec(monkeypatch, checksum_algorithm="sha256", checksum=hashlib.sha256(FAKE_ML100K).hexdigest())
    log = load_movielens("ml-100k", tmp_path / "not-here", cache_dir=tmp_path)
    assert len(log) == 2 and log.num_users == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "ml-100k.zip"]  # no staging folder left
    assert (tmp_path / "ml-100k" / "README").read_text() == "fake"
    load_movielens("ml-100k", None, cache_dir=tmp_path)  # cached now: no second download
    assert len(calls) == 2


def test_cached_archive_checksum_rejects_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ml-100k.zip").write_bytes(FAKE_ML100K)
    monkeypatch.setattr(ml, "_download", lambda *a: pytest.fail("must not download when an archive is cached"))
    with pytest.raises(ChecksumError, match=r"checksum mismatch for .*ml-100k\.zip.*delete .*ml-100k\.zip"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert not (tmp_path / "ml-100k").exists()

    _with_spec(monkeypatch, checksum=hashlib.md5(FAKE_ML100K).hexdigest())
    corrupted = bytearray(FAKE_ML100K)
    corrupted[40] ^= 0xFF
    (tmp_path / "ml-100k.zip").write_bytes(bytes(corrupted))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)

    (tmp_path / "ml-100k.zip").write_bytes(FAKE_ML100K)
    assert len(load_movielens("ml-100k", None, cache_dir=tmp_path)) == 2


def test_archive_without_ratings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _zip_bytes({"other/u.data": "1\t2\t3\t100\n"})
    (tmp_path / "ml-100k.zip").write_bytes(bad)
    _with_spec(monkeypatch, checksum=hashlib.md5(bad).hexdigest())
    with pytest.raises(DataFormatError, match=r"ml-100k\.zip: the archive has no ml-100k/u\.data"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k.zip"]


def test_subset_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, "u.data", "1\t2\t3\t100\n")
    with caplog.at_level(logging.INFO, logger="gr_models.data"):
        load_movielens("ml-100k", tmp_path, download=False)
    assert "1 ratings of 1 users; the full release has 100000 of 943" in caplog.text
