"""Recommendations from an exported artefact, in the data's own item ids.

    python -m distill_jax.recommend --artifact=WORKDIR/export --history=ID,ID,...
    python -m distill_jax.recommend --artifact=WORKDIR/export --history=ID,ID,... --user=UID
    python -m distill_jax.recommend --artifact=WORKDIR/export --input=histories.txt \
        --output=recs.jsonl

`--input` is either one history per line (ids separated by commas or
spaces, oldest first; an empty line is an empty history) or a CSV file with
a header naming a user column and an item column (`--user_col`,
`--item_col`; rows in time order), one history per user. The results are
JSON lines: the line or user, the top-K items with their scores, the ids
that were not known, and whether the popularity fallback was used.

A model trained with user features (MovieLens demographics, a user feature
table) reads the user too: `--user=UID` with `--history`, the user column
of a CSV input, `recommend(history, user=UID)` in Python; all in the data's
own user ids. A user the artefact does not know, or none given, is scored
from the history alone (the note says so).

From Python::

    from distill_jax import recommend
    r = recommend.load("WORKDIR/export")
    rec = r.recommend(["B0001", "B0042"])   # rec.items, rec.scores, rec.note

This module needs jax and numpy only: it imports neither flax nor the
model code, and loading an artefact never unpickles anything (StableHLO and
JSON). Unknown ids are reported and skipped; an empty history, or one with
only unknown ids, gets the most popular items and says so; a history
longer than the model's window is scored on its newest items (all of them
are still excluded from the recommendations).
"""

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

FORMAT = "distill_jax.recommender"  # as written by distill_jax.compress.export
VERSIONS = (1, 2)  # 2: the function also takes user ids


class ArtifactError(ValueError):
    """The artefact or an input file is unusable; the message says which file and why."""


@dataclasses.dataclass
class Recommendation:
    """The top-K for one history, in the data's own ids."""

    items: list[Any]
    scores: list[float | None]  # None for popularity fallback items
    unknown: list[str]  # ids of the history that the artefact does not know
    fallback: bool  # True: no known item, so the most popular items instead
    truncated: bool  # True: longer than the window; scored on the newest items
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Recommender:
    """A loaded artefact: `recommend(history)` and the raw exported `call(ids)`."""

    def __init__(self, directory: str):
        import jax  # Only jax's deserializer: nothing of flax or the models.

        manifest_path = os.path.join(directory, "artifact.json")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ArtifactError(
                f"{manifest_path} does not exist: --artifact must be the directory the "
                "export stage wrote (WORKDIR/export)."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
            raise ArtifactError(
                f"{manifest_path}: format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r}; expected {FORMAT!r} version in {VERSIONS}."
            )
        function_path = os.path.join(directory, manifest["function"])
        try:
            with open(function_path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise ArtifactError(
                f"{function_path} does not exist (the exported function)."
            ) from None
        try:
            self.exported = jax.export.deserialize(bytearray(blob))
        except Exception as e:  # the deserializer raises several kinds for a damaged file
            raise ArtifactError(f"{function_path} is not a jax.export artefact: {e}") from None
        self.weights = [jax.device_put(w) for w in _weights(directory, manifest)]
        # jit: one dispatch per call instead of re-binding the exported module.
        self._call = jax.jit(self.exported.call)
        self.manifest = manifest
        self.directory = directory
        self.top_k = int(manifest["top_k"])
        self.max_len = int(manifest["input"]["max_len"])
        self.item_ids = manifest["item_ids"]
        self._to_internal = {str(v): i for i, v in enumerate(self.item_ids) if i > 0}
        self.popular = [int(i) for i in manifest["popular_items"]]
        self.reads_users = "users" in manifest
        self._user_to_internal = {
            str(v): i for i, v in enumerate(manifest.get("user_ids", [])) if i > 0
        }

    def call(
        self, history: np.ndarray, users: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exported function on `history [B, N]` int32 artefact ids (left-padded with 0).

        `users [B]`: artefact user ids, for an artefact that reads them (None:
        0 for everyone, scored without the user part); others ignore them.
        """
        history = np.asarray(history, np.int32)
        extra = ()
        if self.reads_users:
            if users is None:
                users = np.zeros(history.shape[0], np.int32)
            extra = (np.asarray(users, np.int32),)
        ids, scores = self._call(self.weights, history, *extra)
        return np.asarray(ids), np.asarray(scores)

    def call_device(self, history: Any, *users: Any) -> tuple[Any, Any]:
        """`call` on arrays already on the device, results left there (for timing)."""
        return self._call(self.weights, history, *users)

    def _internal(self, history: Iterable[Any]) -> tuple[list[int], list[str]]:
        known, unknown = [], []
        for raw in history:
            token = str(raw).strip()
            if token in self._to_internal:
                known.append(self._to_internal[token])
            else:
                unknown.append(token)
        return known, unknown

    def _fallback(self, known: list[int], unknown: list[str], reason: str) -> Recommendation:
        seen = set(known) if self.manifest["exclude_history"] else set()
        items = [i for i in self.popular if i not in seen][: self.top_k]
        return Recommendation(
            items=[self.item_ids[i] for i in items],
            scores=[None] * len(items),
            unknown=unknown,
            fallback=True,
            truncated=False,
            note=f"{reason}: the {len(items)} most popular items instead",
        )

    def recommend_many(
        self, histories: Sequence[Sequence[Any]], users: Sequence[Any] | None = None
    ) -> list[Recommendation]:
        """One Recommendation per history (ids in the data's own ids, oldest first).

        `users`: the data's own user id of each history (None where unknown),
        read by an artefact with user features.
        """
        if users is not None and len(users) != len(histories):
            raise ArtifactError(f"{len(users)} users for {len(histories)} histories")
        parsed = [self._internal(h) for h in histories]
        scored = [i for i, (known, _) in enumerate(parsed) if known]
        out: list[Recommendation | None] = [None] * len(histories)
        if scored:
            width = max(len(parsed[i][0]) for i in scored)
            batch = np.zeros((len(scored), width), np.int32)
            user_rows = np.zeros(len(scored), np.int32)
            for row, i in enumerate(scored):
                known = parsed[i][0]
                batch[row, width - len(known) :] = known
                if users is not None and users[i] is not None:
                    user_rows[row] = self._user_to_internal.get(str(users[i]).strip(), 0)
            ids, scores = self.call(batch, user_rows)
            for row, i in enumerate(scored):
                known, unknown = parsed[i]
                keep = np.isfinite(scores[row])  # fewer candidates than K: -inf rows
                notes = []
                if self.reads_users and user_rows[row] == 0:
                    given = None if users is None else users[i]
                    notes.append(
                        "no user given: scored from the history alone"
                        if given is None
                        else f"unknown user {given}: scored from the history alone"
                    )
                if unknown:
                    notes.append(f"unknown ids skipped: {', '.join(unknown)}")
                if len(known) > self.max_len:
                    notes.append(f"scored on the newest {self.max_len} of {len(known)} items")
                out[i] = Recommendation(
                    items=[self.item_ids[int(j)] for j in ids[row][keep]],
                    scores=[float(s) for s in scores[row][keep]],
                    unknown=unknown,
                    fallback=False,
                    truncated=len(known) > self.max_len,
                    note="; ".join(notes),
                )
        for i, (known, unknown) in enumerate(parsed):
            if out[i] is None:
                reason = "empty history" if not unknown else "no known item in the history"
                out[i] = self._fallback(known, unknown, reason)
        return out  # type: ignore[return-value]

    def recommend(self, history: Sequence[Any], user: Any = None) -> Recommendation:
        """The top-K for one history of the data's own item ids, oldest first.

        `user`: the data's own user id, for an artefact with user features.
        """
        return self.recommend_many([history], [user])[0]


def _weights(directory: str, manifest: dict) -> list[np.ndarray]:
    """The weight arrays, in the exported function's order, in their served dtypes."""
    spec = manifest["weights"]
    path = os.path.join(directory, spec["file"])
    try:
        archive = np.load(path, allow_pickle=False)  # never unpickles
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist (the artefact's weights).") from None
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not a NumPy weights archive: {e}") from None
    out = []
    with archive:
        for entry in spec["arrays"]:
            if entry["name"] not in archive.files:
                raise ArtifactError(f"{path}: weight {entry['name']!r} is missing")
            a = archive[entry["name"]]
            if list(a.shape) != entry["shape"] or str(a.dtype) != entry["stored"]:
                raise ArtifactError(
                    f"{path}: weight {entry['name']!r} is {a.dtype}{list(a.shape)}; "
                    f"artifact.json says {entry['stored']}{entry['shape']}"
                )
            if entry["dtype"] == "bfloat16":  # stored as bfloat16 bits, served as float32
                import ml_dtypes  # a dependency of jax

                a = a.view(ml_dtypes.bfloat16).astype(np.float32)
            out.append(a)
    return out


def load(directory: str) -> Recommender:
    """Loads an artefact directory written by the export stage."""
    return Recommender(directory)


def parse_history(text: str, where: str) -> list[str]:
    """Ids of one history line: separated by commas and/or whitespace."""
    if text.strip() == "":
        return []
    parts = [p.strip() for p in text.replace("\t", " ").split(",")] if "," in text else text.split()
    if "," in text and any(p == "" for p in parts):
        raise ArtifactError(f"{where}: an empty id between two commas in {text.strip()!r}")
    out = []
    for p in parts:
        out.extend(p.split())
    return out


def read_histories(
    path: str, user_col: str = "", item_col: str = ""
) -> list[tuple[str, list[str]]]:
    """(label, ids) per history of an input file: 'line N' or the user id."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ArtifactError(f"--input={path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not user_col:
        return [
            (f"line {n}", parse_history(line, f"{path}, line {n}"))
            for n, line in enumerate(text.splitlines(), start=1)
        ]
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None or user_col not in header or item_col not in header:
        raise ArtifactError(
            f"{path}, line 1: expected a header naming --user_col={user_col!r} and "
            f"--item_col={item_col!r}; got {header}"
        )
    u, i = header.index(user_col), header.index(item_col)
    users: dict[str, list[str]] = {}
    for n, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ArtifactError(
                f"{path}, line {n}: {len(row)} fields, the header has {len(header)}"
            )
        if not row[u].strip() or not row[i].strip():
            raise ArtifactError(f"{path}, line {n}: an empty {user_col!r} or {item_col!r} field")
        users.setdefault(row[u].strip(), []).append(row[i].strip())
    return list(users.items())


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m distill_jax.recommend", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--artifact", required=True, help="the export directory (WORKDIR/export)")
    p.add_argument("--history", help="one history: ids separated by commas, oldest first")
    p.add_argument("--user", help="--history's user (the data's own id), for user features")
    p.add_argument("--input", help="a file of histories (see the module docstring)")
    p.add_argument("--output", help="where --input's results go (JSON lines); default stdout")
    p.add_argument("--user_col", default="", help="CSV input: the user column")
    p.add_argument("--item_col", default="item_id", help="CSV input: the item column")
    args = p.parse_args(argv)
    try:
        if (args.history is None) == (args.input is None):
            raise ArtifactError("give exactly one of --history=ID,ID,... and --input=FILE")
        rec = load(args.artifact)
        if args.history is not None:
            r = rec.recommend(parse_history(args.history, "--history"), args.user)
            if args.user is not None and not rec.reads_users:
                print(f"--user={args.user} not used: this model reads no user features")
            if r.note:
                print(r.note)
            for rank, (item, score) in enumerate(zip(r.items, r.scores, strict=True), start=1):
                print(f"{rank}\t{item}\t{'' if score is None else f'{score:.4f}'}")
            return 0
        rows = read_histories(args.input, args.user_col, args.item_col)
        results = rec.recommend_many(
            [ids for _, ids in rows], [label for label, _ in rows] if args.user_col else None
        )
        key = "user" if args.user_col else "line"
        lines = [
            json.dumps(
                {key: label.removeprefix("line ") if key == "line" else label, **r.to_json()}
            )
            for (label, _), r in zip(rows, results, strict=True)
        ]
        if args.output:
            with open(args.output, "w") as f:
                f.write("\n".join(lines) + "\n")
            print(f"{len(lines)} histories -> {args.output}")
        else:
            print("\n".join(lines))
        return 0
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
