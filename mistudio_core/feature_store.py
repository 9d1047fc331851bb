"""Where a feature's findings live: an SQLite index and memory-mapped arrays beside the SAE.

`mistudio find` writes, under `SAE_DIR/features/`:
- `features.sqlite`: one row per feature (firing count, density, max and mean activation), the
  find's parameters (`meta`), explanations (one per feature and explainer) and scores (one per
  feature, scorer and explainer), with indexes for the browser's sorts;
- one `.npy` array per kind of per-feature data, `[d_sae, ...]`, opened with `mmap_mode="r"`:
  examples (`top`, `quantile`, `negative`: token ids, per-token activations, peak values),
  quantile group edges, the activation histogram, logit effects, co-occurring and similar
  features;
- `vocab.json`, every token id's text, so no tokenizer is needed to show a card.

Reading one feature's card touches one SQLite row and one slice of each array, so it takes a few
milliseconds whatever the SAE's width (65k features included). The module needs numpy and the
standard library only: the daemon answers feature queries with it without importing torch.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlite_utils

from mistudio_core.errors import MistudioError

FEATURES_DIR = "features"
DB_FILE = "features.sqlite"
VOCAB_FILE = "vocab.json"
EXAMPLE_SETS = ("top", "quantile", "negative")
NEIGHBOUR_KINDS = ("decoder", "cooccurrence")
PAD_TOKEN = -1  # token id of example positions outside the text
_LISTED = ("SELECT f.id, f.n_fired, f.density, f.max_act, f.mean_act, f.explainer,"
           " f.explanation, s.value")
_LISTED_KEYS = ("id", "n_fired", "density", "max_act", "mean_act", "explainer", "explanation",
                "score")
SORTS = {"id": "f.id", "density": "f.density", "max": "f.max_act", "mean": "f.mean_act",
         "score": "s.value"}



@dataclass
class Example:
    """A span of text around one position, with one feature's activation on every token.

    `tokens` are the tokens' texts (`""` for padding outside the text), `token_ids` their ids
    (`PAD_TOKEN` for padding), `center` the index of the peak (top and quantile examples) or of
    the sampled position (negative examples), `value` the activation there."""

    token_ids: list[int]
    tokens: list[str]
    acts: list[float]
    value: float
    center: int

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "token_ids": self.token_ids, "acts": self.acts,
                "value": self.value, "center": self.center}

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def marked_text(self, threshold: float = 0.0, left: str = "<<", right: str = ">>") -> str:
        """The text with every run of tokens whose activation exceeds `threshold` wrapped in
        `left`/`right` (delphi's and OpenAI's way of showing an LLM where a feature fires)."""
        parts, inside = [], False
        for token, act in zip(self.tokens, self.acts, strict=True):
            active = act > threshold
            if active and not inside:
                parts.append(left)
            elif not active and inside:
                parts.append(right)
            inside = active
            parts.append(token)
        if inside:
            parts.append(right)
        return "".join(parts)


class FeatureStore:
    """The findings about one SAE's features (`SAE_DIR/features/`)."""

    def __init__(self, sae_dir: str | Path) -> None:
        self.sae_dir = Path(sae_dir).expanduser()
        self.directory = self.sae_dir / FEATURES_DIR
        if not (self.directory / DB_FILE).is_file():
            raise MistudioError(
                f"no features found for the SAE in {self.sae_dir}",
                hint=f"run `mistudio find {self.sae_dir} --model M --corpus C` first",
                code="not_found",
            )
        self.db = _connect(self.directory / DB_FILE)
        try:
            self.meta = {row[0]: json.loads(row[1])
                         for row in self.db.execute("SELECT * FROM meta")}
            self.d_sae = int(self.meta["d_sae"])
        except (sqlite3.Error, KeyError, ValueError) as exc:  # a find stopped while creating it
            self.db.close()
            raise MistudioError(
                f"the features of the SAE in {self.sae_dir} are incomplete ({exc})",
                hint=f"run `mistudio find {self.sae_dir} --model M --corpus C` again",
                code="not_found") from exc
        self._arrays: dict[str, np.ndarray] = {}
        self._vocab: list[str] | None = None

    @classmethod
    def create(cls, sae_dir: str | Path, meta: dict) -> FeatureStore:
        """A new, empty store (a previous find's results are replaced, its explanations and
        scores dropped: they describe examples that no longer exist). `meta` needs `d_sae`."""
        directory = Path(sae_dir).expanduser() / FEATURES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        stale_db = [directory / f"{DB_FILE}{suffix}" for suffix in ("", "-wal", "-shm")]
        for stale in [*directory.glob("*.npy"), *stale_db, directory / VOCAB_FILE]:
            stale.unlink(missing_ok=True)
        db = _connect(directory / DB_FILE, create=True)
        with db:
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [(key, json.dumps(value)) for key, value in meta.items()])
        db.close()
        return cls(sae_dir)

    def close(self) -> None:
        self.db.close()
        self._arrays.clear()

    # ----- written by find and correlate -------------------------------------------------------

    def set_meta(self, **values) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(key, json.dumps(value)) for key, value in values.items()])
        self.meta.update(values)

    def write_statistics(self, n_fired: np.ndarray, max_act: np.ndarray, sum_act: np.ndarray,
                         n_tokens: int) -> None:
        """Per-feature firing counts, max and summed activations over `n_tokens` tokens; the
        mean is over the tokens where the feature fires."""
        n_fired = np.asarray(n_fired, dtype=np.int64)
        mean = np.where(n_fired > 0, np.asarray(sum_act, np.float64) / np.maximum(n_fired, 1), 0)
        rows = zip(range(self.d_sae), n_fired.tolist(), (n_fired / max(n_tokens, 1)).tolist(),
                   np.asarray(max_act, np.float64).tolist(), mean.tolist(), strict=True)
        with self.db:
            self.db.execute("DELETE FROM features")
            self.db.executemany("INSERT INTO features (id, n_fired, density, max_act, mean_act)"
                                " VALUES (?, ?, ?, ?, ?)", rows)
        self.set_meta(n_tokens=int(n_tokens))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Save `name.npy` (its first axis is the feature) and forget any mapped old copy."""
        array = np.ascontiguousarray(array)
        if array.shape[0] != self.d_sae:
            raise ValueError(f"{name} has {array.shape[0]} rows, not d_sae={self.d_sae}")
        staging = self.directory / f".{name}.npy"
        np.save(staging, array)
        staging.replace(self.directory / f"{name}.npy")
        self._arrays.pop(name, None)

    def write_examples(self, name: str, token_ids: np.ndarray, acts: np.ndarray,
                       values: np.ndarray) -> None:
        """An example set: token ids `[d_sae, n, width]` (PAD_TOKEN outside the text and in
        empty slots), activations `[d_sae, n, width]`, peak values `[d_sae, n]` (NaN marks an
        empty slot)."""
        if name not in EXAMPLE_SETS:
            raise ValueError(f"example set {name!r} is not one of {EXAMPLE_SETS}")
        self.write_array(f"{name}_tokens", token_ids.astype(np.int32))
        self.write_array(f"{name}_acts", acts.astype(np.float16))
        self.write_array(f"{name}_values", values.astype(np.float32))

    def write_vocabulary(self, texts: list[str]) -> None:
        (self.directory / VOCAB_FILE).write_text(json.dumps(texts))
        self._vocab = None

    def write_neighbours(self, kind: str, ids: np.ndarray, values: np.ndarray) -> None:
        """Each feature's nearest features `[d_sae, n]` (-1 pads) by `kind`: decoder cosine
        or co-occurrence Jaccard."""
        if kind not in NEIGHBOUR_KINDS:
            raise ValueError(f"neighbour kind {kind!r} is not one of {NEIGHBOUR_KINDS}")
        self.write_array(f"{kind}_ids", ids.astype(np.int32))
        self.write_array(f"{kind}_values", values.astype(np.float32))

    # ----- explanations and scores -------------------------------------------------------------

    def save_explanations(self, explainer: str, rows: list[tuple[int, str, dict]]) -> None:
        """`(feature, text, details)` rows of one explainer; later ones replace earlier."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?)",
                [(int(f), explainer, text, json.dumps(details), now) for f, text, details in rows])
            self.db.executemany(
                "INSERT INTO features (id, explainer, explanation) VALUES (?, ?, ?) ON CONFLICT"
                " (id) DO UPDATE SET explainer = excluded.explainer,"
                " explanation = excluded.explanation",
                [(int(f), explainer, text) for f, text, _ in rows])

    def explained(self, explainer: str) -> set[int]:
        query = "SELECT feature FROM explanations WHERE explainer = ?"
        return {row[0] for row in self.db.execute(query, (explainer,))}

    def explanations(self, feature: int) -> list[dict]:
        query = ("SELECT explainer, text, details, created_at FROM explanations WHERE feature = ?"
                 " ORDER BY created_at DESC")
        return [{"explainer": e, "text": t, "details": json.loads(d), "created_at": c}
                for e, t, d, c in self.db.execute(query, (feature,))]

    def explanation(self, feature: int, explainer: str) -> dict | None:
        for entry in self.explanations(feature):
            if entry["explainer"] == explainer:
                return entry
        return None

    def all_explanations(self, explainer: str | None = None) -> list[tuple[int, str, str]]:
        """`(feature, explainer, text)` of every explanation (of one explainer)."""
        query, args = "SELECT feature, explainer, text FROM explanations", ()
        if explainer is not None:
            query, args = query + " WHERE explainer = ?", (explainer,)
        return list(self.db.execute(query + " ORDER BY feature", args))

    def latest_explanations(self, features: list[int] | None = None) -> dict[int, str]:
        """Each feature's most recent explanation, whatever its explainer (of `features`, or
        of every explained feature)."""
        query, args = "SELECT id, explanation FROM features WHERE explanation IS NOT NULL", []
        if features is not None:
            if not features:
                return {}
            query += f" AND id IN ({','.join('?' * len(features))})"
            args = [int(feature) for feature in features]
        return dict(self.db.execute(query + " ORDER BY id", args))

    def fired_features(self) -> list[int]:
        """The features that fired at least once during find."""
        return [row[0] for row in self.db.execute("SELECT id FROM features WHERE n_fired > 0")]

    def save_scores(self, scorer: str, explainer: str,
                    rows: list[tuple[int, float | None, dict]]) -> None:
        """`(feature, value, details)` rows; a None value means the scorer could not score."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                [(int(f), scorer, explainer, _finite(v), json.dumps(details), now)
                 for f, v, details in rows])

    def scored(self, scorer: str, explainer: str) -> set[int]:
        query = "SELECT feature FROM scores WHERE scorer = ? AND explainer = ?"
        return {row[0] for row in self.db.execute(query, (scorer, explainer))}

    def scores(self, feature: int) -> list[dict]:
        query = ("SELECT scorer, explainer, value, details FROM scores WHERE feature = ? "
                 "ORDER BY scorer, explainer")
        return [{"scorer": s, "explainer": e, "value": v, "details": json.loads(d)}
                for s, e, v, d in self.db.execute(query, (feature,))]

    def score_values(self, scorer: str, explainer: str) -> dict[int, float | None]:
        query = "SELECT feature, value FROM scores WHERE scorer = ? AND explainer = ?"
        return dict(self.db.execute(query, (scorer, explainer)))

    # ----- reads -------------------------------------------------------------------------------

    def check_feature(self, feature: int) -> int:
        if not 0 <= feature < self.d_sae:
            raise MistudioError(f"feature {feature} is out of range: this SAE has {self.d_sae} "
                                "features", hint=f"pick a feature from 0 to {self.d_sae - 1}",
                                code="not_found", field="feature")
        return int(feature)

    def array(self, name: str) -> np.ndarray | None:
        """A mapped array, or None if it has not been computed (e.g. before `correlate`)."""
        if name not in self._arrays:
            path = self.directory / f"{name}.npy"
            if not path.is_file():
                return None
            self._arrays[name] = np.load(path, mmap_mode="r")
        return self._arrays[name]

    @property
    def vocabulary(self) -> list[str]:
        if self._vocab is None:
            self._vocab = json.loads((self.directory / VOCAB_FILE).read_text())
        return self._vocab

    def token_texts(self, token_ids) -> list[str]:
        vocab = self.vocabulary
        return [vocab[i] if 0 <= i < len(vocab) else "" for i in token_ids]

    def example_arrays(self, name: str, features) -> tuple[np.ndarray, ...] | None:
        """An example set of several features in one read of each array: token ids
        `[n, slots, width]` (int32), activations (float32) and peak values `[n, slots]` (NaN in
        empty slots); None if find wrote no such set. Explaining or scoring thousands of
        features reads the arrays in a few large slices this way, not example by example."""
        token_ids = self.array(f"{name}_tokens")
        if token_ids is None:
            return None
        rows = np.asarray(features, dtype=np.int64)
        return (np.asarray(token_ids[rows]),
                np.asarray(self.array(f"{name}_acts")[rows], dtype=np.float32),
                np.asarray(self.array(f"{name}_values")[rows]))

    def examples(self, feature: int, name: str) -> list[Example]:
        """One feature's examples of a set, in stored order (top: strongest first; quantile:
        lowest group first), empty slots left out."""
        arrays = self.example_arrays(name, [self.check_feature(feature)])
        if arrays is None:
            return []
        out = []
        for ids, row_acts, value in zip(*(array[0] for array in arrays), strict=True):
            if math.isnan(float(value)):
                continue
            ids = ids.tolist()
            center = len(ids) // 2
            out.append(Example(ids, self.token_texts(ids), [round(float(a), 4) for a in row_acts],
                               float(value), center))
        return out

    def statistics(self, feature: int) -> dict:
        feature = self.check_feature(feature)
        row = self.db.execute("SELECT id, n_fired, density, max_act, mean_act FROM features "
                              "WHERE id = ?", (feature,)).fetchone()
        if row is None:
            return {"id": feature}
        return dict(zip(("id", "n_fired", "density", "max_act", "mean_act"), row, strict=True))

    def quantile_groups(self, feature: int) -> list[dict]:
        """The quantile examples split into their equal-count groups, with each group's range."""
        edges = self.array("quantile_edges")
        if edges is None:
            return []
        n_groups = edges.shape[1] - 1
        per_group = int(self.meta.get("per_quantile", 1))
        examples = self.array("quantile_values")[feature]
        items = self.examples(feature, "quantile")
        groups, taken = [], 0
        for group in range(n_groups):
            slots = examples[group * per_group:(group + 1) * per_group]
            count = int(np.count_nonzero(~np.isnan(slots)))
            groups.append({"group": group, "low": float(edges[feature, group]),
                           "high": float(edges[feature, group + 1]),
                           "examples": [e.to_dict() for e in items[taken:taken + count]]})
            taken += count
        return groups

    def histogram(self, feature: int) -> dict:
        counts = self.array("histogram")
        if counts is None:
            return {}
        return {"log10_edges": self.meta["histogram_log10_edges"],
                "counts": counts[feature].tolist()}

    def logit_effects(self, feature: int) -> dict:
        effects = {}
        for side in ("promoted", "suppressed"):
            ids, values = self.array(f"{side}_ids"), self.array(f"{side}_values")
            if ids is not None:
                effects[side] = [[text, round(float(v), 4)] for text, v in
                                 zip(self.token_texts(ids[feature].tolist()), values[feature],
                                     strict=True)]
        return effects

    def neighbours(self, feature: int, kind: str) -> list[dict]:
        ids, values = self.array(f"{kind}_ids"), self.array(f"{kind}_values")
        if ids is None:
            return []
        pairs = [(int(i), float(v)) for i, v in zip(ids[feature], values[feature], strict=True)
                 if i >= 0]
        texts = self.latest_explanations([i for i, _ in pairs])
        return [{"id": i, "value": round(v, 4), "explanation": texts.get(i)} for i, v in pairs]

    def card(self, feature: int) -> dict:
        """Everything about one feature, as the CLI's `feature` and the TUI's card show it."""
        feature = self.check_feature(feature)
        return {
            **self.statistics(feature),
            "d_sae": self.d_sae,
            "top": [e.to_dict() for e in self.examples(feature, "top")],
            "quantiles": self.quantile_groups(feature),
            "histogram": self.histogram(feature),
            "logits": self.logit_effects(feature),
            "explanations": self.explanations(feature),
            "scores": self.scores(feature),
            "similar": self.neighbours(feature, "decoder"),
            "cooccurring": self.neighbours(feature, "cooccurrence"),
        }

    def list(self, sort: str = "id", descending: bool | None = None, search: str | None = None,
             limit: int = 100, offset: int = 0, scorer: str = "rule") -> tuple[list[dict], int]:
        """A page of features with their statistics, latest explanation and `scorer`'s score
        (of that explanation's explainer), sorted, filtered by a substring of the explanation
        or by an id; and how many match in all. `descending` defaults to True except by id."""
        if sort not in SORTS:
            raise MistudioError(f"cannot sort by {sort!r}", hint=f"use one of {', '.join(SORTS)}",
                                code="bad_request", field="sort")
        descending = sort != "id" if descending is None else descending
        where, args = "", [scorer]
        if search:
            where = "WHERE f.explanation LIKE ? ESCAPE '\\'"
            args.append("%" + search.replace("\\", "\\\\").replace("%", "\\%")
                        .replace("_", "\\_") + "%")
            if search.strip().isdigit():
                where += " OR f.id = ?"
                args.append(int(search))
        total = self.db.execute(f"SELECT count(*) FROM features f {where}", args[1:]).fetchone()[0]
        direction = "DESC" if descending else "ASC"
        if sort == "score":
            return self._list_by_score(where, args, direction, limit, offset), total
        rows = self.db.execute(
            f"{_LISTED} FROM features f LEFT JOIN scores s ON s.feature = f.id AND s.scorer = ?"
            f" AND s.explainer = f.explainer {where} ORDER BY {SORTS[sort]} {direction}, f.id"
            " LIMIT ? OFFSET ?", [*args, limit, offset])
        return [dict(zip(_LISTED_KEYS, row, strict=True)) for row in rows], total

    def _list_by_score(self, where: str, args: list, direction: str, limit: int,
                       offset: int) -> list[dict]:
        """A page by score, the scored features first, then the unscored ones by id.

        The scored part walks the scores index in order (sorting 65k joined rows instead took
        a quarter of a second); the unscored part, read only past the scored ones, starts where
        they end."""
        scored_join = ("FROM scores s JOIN features f ON f.id = s.feature AND"
                       " f.explainer = s.explainer WHERE s.scorer = ? AND s.value IS NOT NULL"
                       + where.replace("WHERE", " AND (", 1) + (")" if where else ""))
        rows = list(self.db.execute(
            f"{_LISTED} {scored_join} ORDER BY s.value {direction}, s.feature {direction}"
            " LIMIT ? OFFSET ?", [*args, limit, offset]))
        if len(rows) < limit:  # past the scored features: count them to know where to go on
            n_scored = self.db.execute(f"SELECT count(*) {scored_join}", args).fetchone()[0]
            unscored = ("WHERE s.value IS NULL" + where.replace("WHERE", " AND (", 1)
                        + (")" if where else ""))
            rows += self.db.execute(
                f"{_LISTED} FROM features f LEFT JOIN scores s ON s.feature = f.id AND"
                f" s.scorer = ? AND s.explainer = f.explainer {unscored} ORDER BY f.id"
                " LIMIT ? OFFSET ?", [*args, limit - len(rows), max(0, offset - n_scored)])
        return [dict(zip(_LISTED_KEYS, row, strict=True)) for row in rows]


def parse_features(text: str | None, d_sae: int) -> list[int] | None:
    """`0-99,120,200-210` as a sorted list of feature ids (None for all features)."""
    if text is None or not text.strip() or text.strip() == "all":
        return None
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high) if high else int(low)
            if not 0 <= first <= last < d_sae:
                raise ValueError(part)
            chosen.update(range(first, last + 1))
    except ValueError as exc:
        raise MistudioError(f"bad feature selection {text!r} for an SAE of {d_sae} features",
                            hint=f"use ids and ranges from 0 to {d_sae - 1}, e.g. 0-99,120",
                            code="bad_request", field="features") from exc
    return sorted(chosen)


def has_features(sae_dir: str | Path) -> bool:
    return (Path(sae_dir).expanduser() / FEATURES_DIR / DB_FILE).is_file()


def _connect(path: Path, create: bool = False) -> sqlite3.Connection:
    """The store's database; with `create`, its tables are made (by `FeatureStore.create`
    only: the daemon opens a store per request, and the schema statements cost more than the
    card's reads). check_same_thread is off: the daemon reads a store from its worker threads,
    one query at a time."""
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.execute("PRAGMA synchronous=NORMAL")
    if not create:
        return connection
    db = sqlite_utils.Database(connection)
    db.execute("PRAGMA journal_mode=WAL")  # persistent: kept in the file for every connection
    db["meta"].create({"key": str, "value": str}, pk="key", not_null={"value"},
                      if_not_exists=True)
    # The latest explanation is copied onto its feature's row, so that the browser's pages sort
    # and filter 65k features without a join per row.
    db["features"].create({"id": int, "n_fired": int, "density": float, "max_act": float,
                           "mean_act": float, "explainer": str, "explanation": str}, pk="id",
                          if_not_exists=True)
    for column in ("density", "max_act"):
        db["features"].create_index([column], if_not_exists=True)
    db["explanations"].create({"feature": int, "explainer": str, "text": str, "details": str,
                               "created_at": float}, pk=("feature", "explainer"),
                              not_null={"text"}, if_not_exists=True)
    db["scores"].create({"feature": int, "scorer": str, "explainer": str, "value": float,
                         "details": str, "created_at": float},
                        pk=("feature", "scorer", "explainer"), if_not_exists=True)
    db["scores"].create_index(["scorer", "value", "feature"], if_not_exists=True)
    return connection


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
