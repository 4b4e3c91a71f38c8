"""MovieLens side information: user attributes (``u.user`` / ``users.dat``) and item genres (``u.item`` /
``movies.dat``), aligned to an InteractionLog's user and item indices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import DataFormatError

# ml-1m's documented age groups; ml-100k's exact ages are bucketed into the same groups.
_AGE_GROUPS = np.array([18, 25, 35, 45, 50, 56])
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML1M_GENRES = ML100K_GENRES[1:]  # movies.dat has no "unknown"
_FILES = {"ml-100k": ("u.user", "u.item", "|"), "ml-1m": ("users.dat", "movies.dat", "::")}
USER_FEATURE_NAMES = ("gender", "age_group", "occupation", "zip_region")


@dataclass(frozen=True)
class UserFeatures:
    """Categorical attributes per user: ``values[u, f]`` in ``[0, cardinalities[f])`` for feature ``names[f]``."""

    names: tuple[str, ...]
    values: np.ndarray  # int64 [num_users, F]
    cardinalities: tuple[int, ...]

    def __post_init__(self) -> None:
        if (
            self.values.ndim != 2
            or self.values.shape[1] != len(self.names)
            or len(self.cardinalities) != len(self.names)
        ):
            raise ValueError(f"UserFeatures: values {self.values.shape} do not match {len(self.names)} names")
        for f, (name, card) in enumerate(zip(self.names, self.cardinalities, strict=True)):
            col = self.values[:, f]
            if len(col) and (col.min() < 0 or col.max() >= card):
                raise ValueError(f"UserFeatures.{name}: values outside [0, {card})")


@dataclass(frozen=True)
class ItemBags:
    """A multi-hot bag per item (e.g. genres): item ``i`` holds ``values[offsets[i]:offsets[i + 1]]``."""

    name: str
    offsets: np.ndarray  # int64 [num_items + 1]
    values: np.ndarray  # int64 [nnz] in [0, cardinality)
    cardinality: int

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.values):
            raise ValueError(f"ItemBags.{self.name}: offsets must start at 0 and end at len(values)")
        if (np.diff(self.offsets) < 0).any():
            raise ValueError(f"ItemBags.{self.name}: offsets must be non-decreasing")
        if len(self.values) and (self.values.min() < 0 or self.values.max() >= self.cardinality):
            raise ValueError(f"ItemBags.{self.name}: values outside [0, {self.cardinality})")

    @property
    def num_items(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, name: str, bags: list[list[int]], cardinality: int) -> ItemBags:
        lengths = np.array([len(b) for b in bags], dtype=np.int64)
        offsets = np.zeros(len(bags) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.array([v for b in bags for v in b], dtype=np.int64)
        return cls(name, offsets, values, cardinality)


def _side_file(ratings_dir: Path, name: str) -> Path:
    path = ratings_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the MovieLens folder must hold {name} next to its ratings file")
    return path


def _rows(path: Path, sep: str, min_fields: int) -> list[tuple[int, list[str]]]:
    rows = []
    # MovieLens side files are Latin-1 (accented titles).
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) < min_fields:
            raise DataFormatError(f"{path}:{lineno}: expected >= {min_fields} fields separated by {sep!r}: {line!r}")
        try:
            raw_id = int(fields[0])
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: id {fields[0]!r} is not an integer") from None
        rows.append((raw_id, fields))
    return rows


def _align(what: str, path: Path, rows: dict[int, object], raw_ids: np.ndarray) -> list[object]:
    missing = [int(r) for r in raw_ids if int(r) not in rows]
    if missing:
        raise DataFormatError(f"{path}: no row for {len(missing)} {what}(s) of the ratings, e.g. id {missing[0]}")
    return [rows[int(r)] for r in raw_ids]


def load_movielens_user_features(name: str, ratings_dir: Path, log: InteractionLog) -> UserFeatures:
    """Gender, age group (ml-1m's 7 groups), occupation and zip region (first digit; 10 = non-numeric)."""
    if name not in _FILES:
        raise ValueError(f"user features exist for {sorted(_FILES)}, not {name!r}")
    user_file, _, sep = _FILES[name]
    path = _side_file(ratings_dir, user_file)
    parsed: dict[int, object] = {}
    occupations: dict[str, int] = {}
    for raw_id, f in _rows(path, sep, 5):
        if name == "ml-100k":  # id|age|gender|occupation|zip
            age_text, gender, occupation, zip_code = f[1], f[2], f[3], f[4]
        else:  # UserID::Gender::Age::Occupation::Zip-code
            gender, age_text, occupation, zip_code = f[1], f[2], f[3], f[4]
        if gender not in ("M", "F"):
            raise DataFormatError(f"{path}: user {raw_id} has gender {gender!r}, expected M or F")
        try:
            age = int(age_text)
        except ValueError:
            raise DataFormatError(f"{path}: user {raw_id} has a non-integer age {age_text!r}") from None
        occ = occupations.setdefault(occupation.strip(), len(occupations))
        region = int(zip_code[0]) if zip_code[:1].isdigit() else 10
        parsed[raw_id] = (int(gender == "F"), int(np.searchsorted(_AGE_GROUPS, age, side="right")), occ, region)
    values = np.array(_align("user", path, parsed, log.raw_user_ids), dtype=np.int64).reshape(-1, 4)
    return UserFeatures(USER_FEATURE_NAMES, values, (2, len(_AGE_GROUPS) + 1, max(len(occupations), 1), 11))


def load_movielens_genres(name: str, ratings_dir: Path, log: InteractionLog) -> ItemBags:
    """Genres of every item of ``log`` as a multi-hot bag (ids index ``ML100K_GENRES`` / ``ML1M_GENRES``)."""
    if name not in _FILES:
        raise ValueError(f"genres exist for {sorted(_FILES)}, not {name!r}")
    _, item_file, sep = _FILES[name]
    path = _side_file(ratings_dir, item_file)
    parsed: dict[int, object] = {}
    if name == "ml-100k":
        for raw_id, f in _rows(path, sep, 5 + len(ML100K_GENRES)):
            flags = f[-len(ML100K_GENRES) :]
            if any(x not in ("0", "1") for x in flags):
                raise DataFormatError(f"{path}: item {raw_id} has genre flags {flags}, expected 0/1")
            parsed[raw_id] = [g for g, x in enumerate(flags) if x == "1"]
        names: tuple[str, ...] = ML100K_GENRES
    else:
        index = {g: i for i, g in enumerate(ML1M_GENRES)}
        for raw_id, f in _rows(path, sep, 3):
            genres = f[-1].split("|")
            unknown = [g for g in genres if g not in index]
            if unknown:
                raise DataFormatError(f"{path}: item {raw_id} has unknown genre(s) {unknown}")
            parsed[raw_id] = [index[g] for g in genres]
        names = ML1M_GENRES
    return ItemBags.from_lists("genre", _align("item", path, parsed, log.raw_item_ids), len(names))  # type: ignore[arg-type]
