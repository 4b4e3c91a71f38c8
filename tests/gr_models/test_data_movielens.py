"""MovieLens loading: the real ml-100k files, and every malformed-input path on small files written here."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gr_models.data import movielens
from gr_models.data.movielens import DataFormatError, load_movielens
from gr_models.data.sequences import build_user_sequences


def test_real_ml100k(ml100k_dir: Path) -> None:
    log = load_movielens("ml-100k", ml100k_dir, download=False)
    assert (len(log), log.num_users, log.num_items) == (100000, 943, 1682)
    assert log.raw_item_ids[0] == 1 and log.raw_user_ids[-1] == 943
    assert set(np.unique(log.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    seqs = build_user_sequences(log)
    assert len(seqs) == 943 and seqs.num_dropped_users == 0  # every ml-100k user rated >= 20 movies
    for p in range(0, 943, 97):
        assert (np.diff(seqs.timestamps_of(p)) >= 0).all()
    # the parent folder also works (data_dir/<name>/u.data)
    assert len(load_movielens("ml-100k", ml100k_dir.parent, download=False)) == 100000


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_ties_keep_file_order(tmp_path: Path) -> None:
    _write(tmp_path, "u.data", "1\t5\t3\t100\n1\t3\t4\t100\n1\t9\t2\t50\n1\t4\t5\t100\n")
    log = load_movielens("ml-100k", tmp_path, download=False)
    seqs = build_user_sequences(log, min_interactions=1)
    assert log.raw_item_ids[seqs.items_of(0)].tolist() == [9, 5, 3, 4]


@pytest.mark.parametrize(
    "text, match",
    [
        ("1\t2\t3\t100\n1\t2\t3\n", r"u\.data:2: expected 4 fields"),
        ("1\t2\t3\t100\nx\t2\t3\t100\n", r"u\.data:2: user id must be a non-negative integer"),
        ("1\t2\t3\t100\n1\t2.5\t3\t100\n", r"u\.data:2: item id must be a non-negative integer"),
        ("1\t2\tbad\t100\n", r"u\.data:1: rating must be a number"),
        ("1\t2\t3\t100\n0\t2\t3\t100\n", r"u\.data:2: user id 0 out of range \[1, 943\]"),
        ("1\t1683\t3\t100\n", r"u\.data:1: item id 1683 out of range \[1, 1682\]"),
        ("", r"u\.data: file is empty"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    _write(tmp_path, "u.data", text)
    with pytest.raises(DataFormatError, match=match):
        load_movielens("ml-100k", tmp_path, download=False)


def test_u_info_limits_ids(tmp_path: Path) -> None:
    _write(tmp_path, "u.info", "3 users\n10 items\n3 ratings\n")
    _write(tmp_path, "u.data", "1\t2\t3\t100\n2\t11\t3\t100\n")
    with pytest.raises(DataFormatError, match=r"u\.data:2: item id 11 out of range \[1, 10\]"):
        load_movielens("ml-100k", tmp_path, download=False)


def test_ml1m_and_ml20m_formats(tmp_path: Path) -> None:
    _write(tmp_path / "ml-1m", "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    log = load_movielens("ml-1m", tmp_path, download=False)
    assert log.raw_item_ids.tolist() == [661, 1193] and log.timestamps.tolist() == [978300760, 978302109]
    _write(tmp_path / "ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1\n")
    log = load_movielens("ml-20m", tmp_path, download=False)
    assert log.ratings.tolist() == [3.5, 4.0]
    _write(tmp_path / "bad", "ratings.dat", "1::1193::5::978300760\n2::661::3\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: expected 4 fields separated by '::'"):
        load_movielens("ml-1m", tmp_path / "bad", download=False)


def test_missing_files_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u\.data not found \(looked in .*empty/u\.data"):
        load_movielens("ml-100k", tmp_path / "empty", download=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"unknown MovieLens dataset 'ml-7'; valid names: \['ml-100k'"):
        load_movielens("ml-7", tmp_path)


def test_offline_download_says_how_to_use_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = movielens.MOVIELENS_DATASETS["ml-100k"]
    monkeypatch.setitem(
        movielens.MOVIELENS_DATASETS,
        "ml-100k",
        movielens.MovieLensSpec(**{**spec.__dict__, "url": "http://127.0.0.1:9/x.zip"}),
    )
    with pytest.raises(RuntimeError, match=r"appears to be offline.*data_dir"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.part"))  # no half-written archive left behind


def _fake_archive(cache: Path) -> bytes:
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t2\t3\t100\n2\t3\t4\t200\n")
    return (cache / "ml-100k.zip").read_bytes()


def test_cached_archive_checksum_verified_and_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fake_archive(tmp_path)
    spec = movielens.MOVIELENS_DATASETS["ml-100k"]
    with pytest.raises(RuntimeError, match=r"checksum mismatch .* expected 0e33842e"):
        load_movielens("ml-100k", None, cache_dir=tmp_path)
    good = movielens.MovieLensSpec(**{**spec.__dict__, "md5": hashlib.md5(data).hexdigest()})
    monkeypatch.setitem(movielens.MOVIELENS_DATASETS, "ml-100k", good)
    log = load_movielens("ml-100k", None, cache_dir=tmp_path)
    assert len(log) == 2 and (tmp_path / "ml-100k" / "u.data").is_file()


def test_dropped_users_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, "u.data", "1\t1\t3\t1\n1\t2\t3\t2\n1\t3\t3\t3\n2\t1\t3\t1\n2\t2\t3\t2\n3\t4\t3\t1\n")
    with caplog.at_level(logging.INFO, logger="gr_models.data"):
        seqs = build_user_sequences(load_movielens("ml-100k", tmp_path, download=False), min_interactions=3)
    assert len(seqs) == 1 and seqs.num_dropped_users == 2
    assert "dropped 2 of 3 users with fewer than 3 interactions" in caplog.text
