"""Ranking data: the per-user time split, batches, MovieLens side files, KuaiRand-1K layout, synthetic default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gr_models.data.kuairand import SIGNALS, STANDARD_LOGS, USER_ATTRIBUTES, load_kuairand_ranking
from gr_models.data.movielens import DataFormatError
from gr_models.data.movielens_features import ItemBags, UserFeatures
from gr_models.data.ranking import RankingDataError, RankingDataset, RankingLog, ranking_split
from gr_models.data.ranking_sources import load_movielens_ranking, synthetic_ranking
from gr_models.data.synthetic import SyntheticConfig

ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


def small_log(lengths: list[int]) -> RankingLog:
    total = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ratings = (np.arange(total) % 5 + 1).astype(np.float32)
    return RankingLog(
        users=np.arange(len(lengths), dtype=np.int64),
        offsets=offsets,
        items=np.arange(total, dtype=np.int64) % 7,
        timestamps=np.arange(total, dtype=np.int64) * 10,
        actions=(ratings - 1).astype(np.int64),
        labels={"like": (ratings >= 4).astype(np.float32), "rating": ratings},
        num_items=7,
        num_actions=5,
        user_features=UserFeatures(("user_id",), np.arange(len(lengths), dtype=np.int64)[:, None], (len(lengths),)),
        item_bags=ItemBags.from_lists("genre", [[i % 3] for i in range(7)], 3),
        source="test",
    )


def test_split_windows_by_time() -> None:
    log = small_log([13, 4, 30])
    s = ranking_split(log, num_candidates=3, max_history=5, min_history=2)
    # User 0 (rows 0..12): test 10..12, valid 7..9, train 4..6 (history 2..3 is >= 2) and 1..3 dropped (history 1).
    # User 1 (rows 13..16): test 14..16 has history 1 < 2: no windows at all.
    test = {(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(*vars(s["test"]).values(), strict=True)}
    assert test == {(0, 5, 10, 13), (2, 39, 44, 47)}
    assert (0, 2, 7, 10) in set(zip(*vars(s["valid"]).values(), strict=True))
    train0 = [int(c) for p, c in zip(s["train"].seq, s["train"].cand_start, strict=True) if p == 0]
    assert train0 == [4]
    train2 = [int(c) - 17 for p, c in zip(s["train"].seq, s["train"].cand_start, strict=True) if p == 2]
    assert train2 == [21, 18, 15, 12, 9, 6, 3]  # back from 30 - 9 in strides of 3 while history >= 2
    for w in s.values():  # histories are capped and never overlap the candidates
        assert ((w.cand_start - w.hist_start) <= 5).all() and ((w.cand_end - w.cand_start) == 3).all()
    with pytest.raises(ValueError, match="min_history"):
        ranking_split(log, 3, max_history=1, min_history=2)


def test_collate_builds_the_jagged_batch() -> None:
    log = small_log([13, 30])
    s = ranking_split(log, 3, 5, 1)
    ds = RankingDataset(log, s["test"])
    b = ds.collate([1, 0])
    assert b.users.tolist() == [1, 0]
    assert b.history_lengths.tolist() == [5, 5] and b.candidate_lengths.tolist() == [3, 3]
    assert b.candidate_timestamps.tolist() == [400, 410, 420, 100, 110, 120]
    assert b.history_items.tolist() == [(r % 7) for r in [*range(35, 40), *range(5, 10)]]
    assert b.labels["rating"].tolist() == [float(r % 5 + 1) for r in [40, 41, 42, 10, 11, 12]]
    assert b.request_timestamps.tolist() == [400, 100]
    assert b.history_bag_lengths.tolist() == [1] * 10 and b.candidate_users.tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(RankingDataError, match="no windows"):
        RankingDataset(log, ranking_split(small_log([2]), 3)["test"])


def test_log_validation_names_the_problem() -> None:
    log = small_log([5])
    with pytest.raises(RankingDataError, match="actions must lie"):
        RankingLog(**{**vars(log), "actions": log.actions + 5})
    with pytest.raises(RankingDataError, match="labels"):
        RankingLog(**{**vars(log), "labels": {"like": np.zeros(2, np.float32)}})


def test_synthetic_ranking_default() -> None:
    log = synthetic_ranking(SyntheticConfig(num_users=50, num_items=60, num_topics=4, max_seq_len=40))
    assert set(log.labels) == {"like", "rating"} and log.user_features.names == ("user_id", "activity")
    assert log.item_bags is not None and log.item_bags.cardinality == 4
    np.testing.assert_array_equal(log.labels["like"], (log.labels["rating"] >= 4).astype(np.float32))


def write_movielens(folder: Path) -> None:
    folder.mkdir()
    rows = [(1, 1, 5, 100), (1, 2, 3, 200), (2, 2, 4, 150), (1, 3, 1, 300), (2, 1, 2, 50)]
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|K1A0B\n")
    flags = ["0|1" + "|0" * 17, "1" + "|0" * 18, "0|0|0|1" + "|0" * 15]
    (folder / "u.item").write_text("".join(f"{i}|T{i}|01-Jan-1995||url|{f}\n" for i, f in enumerate(flags, 1)))


def test_movielens_ranking_from_local_files(tmp_path: Path) -> None:
    write_movielens(tmp_path / "ml-100k")
    log = load_movielens_ranking("ml-100k", tmp_path / "ml-100k", download=False)
    assert log.user_features.names == ("user_id", "gender", "age_group", "occupation", "zip_region")
    # user 1: M, age 24 -> group 1 (18-24), zip 8; user 2: F, 53 -> group 5 (50-55), non-numeric zip -> 10.
    assert log.user_features.values.tolist() == [[0, 0, 1, 0, 8], [1, 1, 5, 1, 10]]
    bags = log.item_bags
    assert bags is not None and [bags.values[bags.offsets[i] : bags.offsets[i + 1]].tolist() for i in range(3)] == [
        [1],
        [0],
        [3],
    ]
    assert log.items.tolist() == [0, 1, 2, 0, 1]  # user 1 by time, then user 2 by time
    assert log.labels["like"].tolist() == [1, 0, 0, 0, 1] and log.actions.tolist() == [4, 2, 0, 1, 3]


def test_movielens_side_file_errors(tmp_path: Path) -> None:
    write_movielens(tmp_path / "ml-100k")
    (tmp_path / "ml-100k" / "u.user").write_text("1|24|M|technician|85711\n")
    with pytest.raises(DataFormatError, match="no row for 1 user"):
        load_movielens_ranking("ml-100k", tmp_path / "ml-100k", download=False)
    (tmp_path / "ml-100k" / "u.user").write_text("1|24|X|technician|85711\n2|53|F|other|1\n")
    with pytest.raises(DataFormatError, match="gender 'X'"):
        load_movielens_ranking("ml-100k", tmp_path / "ml-100k", download=False)
    (tmp_path / "ml-100k" / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match=r"u\.user"):
        load_movielens_ranking("ml-100k", tmp_path / "ml-100k", download=False)


LOG_HEADER = "user_id,video_id,date,hourmin,time_ms," + ",".join(SIGNALS) + ",play_time_ms,duration_ms,is_rand,tab"


def write_kuairand(root: Path, log_rows: list[str] | None = None) -> Path:
    data = root / "KuaiRand-1K" / "data"
    data.mkdir(parents=True)
    rows = log_rows or [
        # user, video, date, hourmin, time_ms, click, like, follow, comment, forward, hate, long_view, ...
        "5,100,20220408,1000,1649390000000,1,0,0,0,0,0,1,3000,9000,0,1",
        "5,200,20220408,1000,1649380000000,0,0,0,0,0,0,0,100,9000,0,1",
        "9,100,20220409,1100,1649480000000,1,1,0,0,0,0,1,9000,9000,0,1",
    ]
    (data / STANDARD_LOGS[0]).write_text(LOG_HEADER + "\n" + "\n".join(rows) + "\n")
    (data / STANDARD_LOGS[1]).write_text(LOG_HEADER + "\n5,300,20220422,900,1649990000000,1,0,1,0,0,0,0,1,1,0,1\n")
    attrs = ",".join(USER_ATTRIBUTES)
    (data / "user_features_1k.csv").write_text(
        f"user_id,{attrs},onehot_feat0\n5,high_active,0,0,0,(0;10],0,0,[60;90),1\n9,UNKNOWN,1,0,1,0,0,0,15-30,2\n"
    )
    (data / "video_features_basic_1k.csv").write_text(
        'video_id,author_id,video_type,tag\n100,1,NORMAL,"12,7"\n200,2,AD,\n300,3,NORMAL,7\n'
    )
    return data


def test_kuairand_layout(tmp_path: Path) -> None:
    write_kuairand(tmp_path)
    log = load_kuairand_ranking(tmp_path, download=False)
    assert log.items.tolist() == [1, 0, 2, 0]  # user 5 by time (videos 200, 100, 300), then user 9
    assert log.labels["is_click"].tolist() == [0, 1, 1, 1] and log.labels["long_view"].tolist() == [0, 1, 0, 1]
    assert log.actions.tolist() == [0, 1 | 64, 1 | 4, 1 | 2 | 64] and log.num_actions == 128
    assert log.user_features.names[0] == "user_id" and log.user_features.values.shape == (2, 9)
    bags = log.item_bags
    assert bags is not None and bags.cardinality == 2 and np.diff(bags.offsets).tolist() == [2, 0, 1]
    s = ranking_split(log, num_candidates=1, max_history=10)
    # User 9 has one event (no history for a window); user 5: test = 3rd event, valid = 2nd, no train window.
    assert len(s["test"]) == 1 and len(s["valid"]) == 1 and len(s["train"]) == 0


def test_kuairand_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_kuairand_ranking(tmp_path, download=False, cache_dir=tmp_path / "cache")
    data = write_kuairand(tmp_path / "a", ["5,100,20220408,1000,1649390000000,2,0,0,0,0,0,1,3000,9000,0,1"])
    with pytest.raises(DataFormatError, match="is_click must be 0/1"):
        load_kuairand_ranking(data, download=False)
    data = write_kuairand(tmp_path / "b")
    (data / STANDARD_LOGS[1]).write_text("user_id,video_id\n5,100\n")
    with pytest.raises(DataFormatError, match="missing column"):
        load_kuairand_ranking(tmp_path / "b", download=False)
    data = write_kuairand(tmp_path / "c", ["7,100,20220408,1000,1649390000000,1,0,0,0,0,0,1,3000,9000,0,1"])
    with pytest.raises(DataFormatError, match="no row for 1 user"):
        load_kuairand_ranking(data, download=False)


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="../shared/data/ml-100k not present")
def test_short_training_on_movielens_100k_lowers_the_loss() -> None:
    from gr_models.data.batching import EpochBatchSampler
    from gr_models.data.ranking import make_ranking_dataloader
    from gr_models.ranking import HSTURankingConfig, HSTURankingModel, MultiTaskLoss, RankingFeatureSpec, RankingTask

    log = load_movielens_ranking("ml-100k", ML100K, download=False)
    ds = RankingDataset(log, ranking_split(log, 10, max_history=20)["train"])
    tasks = [RankingTask("like"), RankingTask("rating", "regression", 0.1)]
    torch.manual_seed(0)
    model = HSTURankingModel(
        HSTURankingConfig(RankingFeatureSpec.of_log(log), tasks, embedding_dim=32, max_seq_len=40, dropout=0.0)
    )
    loss_fn, opt = MultiTaskLoss(tasks), torch.optim.Adam(model.parameters(), lr=3e-3)
    held = ds.collate(list(range(0, len(ds), 8)))  # a fixed eighth of the windows, scored before and after

    def like_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(held), held.labels)[1]["like"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster than two contended ones
    try:
        before = like_loss()
        loader = make_ranking_dataloader(ds, EpochBatchSampler(len(ds), 128, shuffle=True, seed=0))
        for step, batch in enumerate(loader):
            loss, _ = loss_fn(model(batch), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 29:
                break
        after = like_loss()
    finally:
        torch.set_num_threads(threads)
    rate = float(held.labels["like"].mean())
    base_rate_entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))  # loss of a constant predictor
    assert after < before - 0.02 and after < base_rate_entropy - 0.015
