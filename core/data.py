"""Load and validate ``.jsonl``/``.json`` (an object per line), ``.csv`` and ``.tsv`` datasets; torch-free."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.errors import DataIssue, DatasetFormatError, InvalidSpec

TASKS = ("classification", "generation")
MAX_ISSUES = 1000  # issues kept in a DatasetFormatError; all of them are counted
_FIELDS = {"classification": (("text", ("text", "sentence", "content")), ("label", ("label",))),
           "generation": (("prompt", ("prompt", "mr")), ("completion", ("completion", "ref")))}
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))([eE][+-]?[0-9]+)?")
Lines = Iterator[tuple[int, "str | None"]]  # (line number, text); text is None when the line was reported


@dataclass(frozen=True, slots=True)
class Example:
    """``text`` + ``label`` index (classification), or prompt ``text`` + ``completion`` (generation)."""
    text: str
    label: int | None = None
    completion: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A validated dataset. ``label_names[i]`` names label ``i``; None for bare 0..K-1 int labels."""
    task: str
    examples: tuple[Example, ...]
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), else None."""
        return None if self.task != "classification" else len(self.label_names) if self.label_names else \
            1 + max((e.label or 0 for e in self.examples), default=0)

    @property
    def refs(self) -> dict[str, list[str]] | None:
        """Generation: every completion of each prompt (multi-ref BLEU), in first-seen order; a fresh dict."""
        out: dict[str, list[str]] = {}
        for e in self.examples if self.task == "generation" else ():
            out.setdefault(e.text, []).append(e.completion or "")
        return out if self.task == "generation" else None


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`validate_file` reports; ``label_counts[i]`` counts label ``i``; text: generation prompt."""
    task: str
    rows: int
    label_names: tuple[str, ...] | None
    label_counts: tuple[int, ...] | None
    max_text_chars: int
    mean_text_chars: float
    prompts: int | None  # distinct prompts (generation)


class _Issues(list[DataIssue]):
    """The first :data:`MAX_ISSUES` issues; ``total`` counts all of them."""
    total = 0

    def add(self, line: int | None, field: str | None, message: str) -> None:
        self.total += 1
        if len(self) < MAX_ISSUES:
            self.append(DataIssue(line, message, field))

    def check(self) -> None:
        """Raise :class:`DatasetFormatError` (issues by line, file-level first) if there is any issue."""
        more = [DataIssue(None, f"{self.total - len(self)} more problem(s) not listed ({self.total} in all)")]
        if self.total:
            raise DatasetFormatError(sorted(self, key=lambda i: (i.line is not None, i.line or 0))
                                     + more[: self.total > len(self)])


def load_dataset(path: str | Path, *, task: str, label_names: Sequence[str] | None = None,
                 max_rows: int | None = None, max_line_bytes: int = 1_000_000,
                 max_text_chars: int = 20_000) -> Dataset:
    """Read and validate ``path``; raise :class:`DatasetFormatError` listing every problem found.

    Fields: classification ``text`` (or ``sentence``/``content``) + ``label``; generation ``prompt`` (or
    ``mr``) + ``completion`` (or ``ref``); the first alias present wins. Int labels 0..K-1 stay as they are;
    other ints and string labels map to sorted names. Given ``label_names``, string labels must be among them
    and int labels index them. ``max_rows`` keeps the first N data rows. Bad arguments raise InvalidSpec.
    """
    if task not in TASKS:
        raise InvalidSpec(f"unknown task {task!r}; expected one of {', '.join(TASKS)}", param="task")
    for param, limit in (("max_rows", max_rows), ("max_line_bytes", max_line_bytes),
                         ("max_text_chars", max_text_chars)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidSpec(f"{param} must be a positive integer", param=param)
    names = None if label_names is None else tuple(label_names)
    if names is not None and (task != "classification" or isinstance(label_names, str) or len(set(names)) < 2
                              or len(set(names)) < len(names) or any(not x or x != x.strip() for x in names)):
        raise InvalidSpec("label_names: 2+ distinct unpadded names, classification only", param="label_names")
    path, issues, rows, count = Path(path), _Issues(), [], 0
    if (ext := path.suffix.lower()) not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DatasetFormatError([DataIssue(None, f"unsupported file type {ext!r}; use JSONL, CSV or TSV")])
    with path.open("rb") as fh:
        lines, cell = _read_lines(fh, max_line_bytes, issues), ext in (".csv", ".tsv")
        for line, rec in _table_rows(lines, ext, task, issues) if cell else _json_rows(lines, issues):
            count += 1
            values = [_field(rec, f, aliases, line, cell, names, max_text_chars, issues)
                      for f, aliases in _FIELDS[task] if rec is not None]
            if values and None not in values:
                rows.append((line, *values))
            if count == max_rows:
                break
    if count == 0 and issues.total == 0:
        issues.add(None, None, "file is empty" if path.stat().st_size == 0 else "file has no data rows")
    classify = task == "classification"
    labels, names = _map_labels(rows, names, issues) if classify else ([None] * len(rows), None)
    if classify and rows and issues.total == 0 and len(set(labels)) < 2:  # checked only if no row was dropped
        issues.add(None, "label", "classification needs at least 2 distinct labels; found 1")
    issues.check()
    return Dataset(task, tuple(Example(t, label=i) if classify else Example(t, completion=v)
                               for (_, t, v), i in zip(rows, labels)), names)


def validate_file(path: str | Path, *, task: str, label_names: Sequence[str] | None = None,
                  max_rows: int | None = None, max_line_bytes: int = 1_000_000,
                  max_text_chars: int = 20_000) -> DatasetSummary:
    """Validate like :func:`load_dataset` (same errors) and summarize the rows."""
    ds = load_dataset(path, task=task, label_names=label_names, max_rows=max_rows,
                      max_line_bytes=max_line_bytes, max_text_chars=max_text_chars)
    lens, counts, k = [len(e.text) for e in ds.examples], Counter(e.label for e in ds.examples), ds.num_labels
    return DatasetSummary(task=task, rows=len(ds), label_names=ds.label_names,
                          label_counts=tuple(counts[i] for i in range(k)) if k else None,
                          max_text_chars=max(lens), mean_text_chars=sum(lens) / len(ds),
                          prompts=len(ds.refs or ()) if task == "generation" else None)


def split_holdout(dataset: Dataset, *, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministically split into ``(train, holdout)``, holding out about ``fraction`` of the rows.

    Stratified by label (classification); whole prompts, so all refs of one land on one side (generation).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise InvalidSpec("fraction must be strictly between 0 and 1", param="fraction")
    n, rng, ex, held = len(dataset), random.Random(seed), dataset.examples, set()
    if dataset.task == "classification":  # shuffle, stable-sort by label, hold out every (1/fraction)-th row
        order = sorted(rng.sample(range(n), n), key=lambda i: ex[i].label or 0)
        held = {i for j, i in enumerate(order) if int((j + 1) * fraction) > int(j * fraction)}
    else:
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(ex):
            groups.setdefault(e.text, []).append(i)
        parts = list(groups.values()) if len(groups) > 1 else [[i] for i in range(n)]
        for part in rng.sample(parts, len(parts))[:-1]:  # the last part always stays in train
            if len(held) + len(part) / 2 <= fraction * n:  # skip a part that would overshoot by over half
                held.update(part)
    if not 0 < len(held) < n:
        raise InvalidSpec(f"fraction={fraction} of {n} row(s) leaves one side empty", param="fraction")
    train, holdout = (Dataset(dataset.task, tuple(e for i, e in enumerate(ex) if (i in held) is side),
                              dataset.label_names) for side in (False, True))
    return train, holdout


def write_jsonl(dataset: Dataset, path: str | Path) -> None:
    """Write canonical JSONL: ``{"text","label"}`` (label name when named) or ``{"prompt","completion"}``."""
    path, names = Path(path), dataset.label_names
    rows = ({"text": e.text, "label": names[e.label] if names and e.label is not None else e.label}
            if dataset.task == "classification" else {"prompt": e.text, "completion": e.completion}
            for e in dataset.examples)
    tmp = path.with_name(path.name + ".tmp")  # write, then rename: a reader never sees half a file
    tmp.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    os.replace(tmp, path)


def _read_lines(fh: IO[bytes], max_bytes: int, issues: _Issues) -> Lines:
    """Yield each line without its terminator; an over-long line is skipped, never held whole in memory."""
    line = 0
    while chunk := fh.readline(max_bytes + 2):
        line, size, body = line + 1, len(chunk), chunk.removesuffix(b"\n").removesuffix(b"\r")
        if len(body) > max_bytes:
            while not chunk.endswith(b"\n") and (chunk := fh.readline(1 << 20)):
                size += len(chunk)
            issues.add(line, None, f"line is longer than max_line_bytes={max_bytes:,} ({size:,} bytes)")
            yield line, None
            continue
        try:
            text: str | None = body.decode("utf-8").removeprefix("\ufeff" if line == 1 else "")
        except UnicodeDecodeError as e:
            text, utf16 = None, line == 1 and body[:2] in (b"\xff\xfe", b"\xfe\xff")
            issues.add(line, None, f"not valid UTF-8{' (it looks like UTF-16)' * utf16}: "
                       f"byte 0x{body[e.start]:02x} at byte {e.start + 1}")
        yield line, text


def _json_rows(lines: Lines, issues: _Issues) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, object)`` per non-blank line; object is None when the line was reported."""
    for line, text in lines:
        if text is not None and not text.strip():
            continue
        try:
            obj = None if text is None else json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            obj = None
            issues.add(line, None, f"invalid JSON: {getattr(e, 'msg', 'nested too deeply')} "
                       f"(column {getattr(e, 'colno', 1)})")
        if obj is not None and not isinstance(obj, dict):
            issues.add(line, None, f"expected a JSON object on each line, got {json.dumps(obj)[:40]}")
            obj = None
        yield line, obj


def _table_rows(lines: Lines, ext: str, task: str, issues: _Issues) -> Iterator[tuple[int, Any]]:
    """Yield ``(first line, {column: cell})`` per non-blank data row; None when the row was reported."""
    tsv = ext == ".tsv"  # TSV: tab-separated, one row per line, no quoting
    reader = csv.reader((("\x00" if t is None else t) + "\n" for _, t in lines), strict=True,
                        delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    cols: list[str] | None = None  # None until the header is read; [] when it lacks a needed column
    while True:
        start, cells = reader.line_num + 1, None  # one string per physical line, so line_num is the line
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            issues.add(start, None, f"malformed {ext[1:].upper()}: {e}")
        if cells is not None and not any(c.strip() for c in cells):
            continue  # a blank line
        cells = None if cells == ["\x00"] else cells  # "\x00" stands for a line already reported
        if cols is None:
            cols, before = [c.strip().lower() for c in cells or []], issues.total
            for field, aliases in _FIELDS[task] if cells is not None else ():
                if not any(a in cols for a in aliases):
                    issues.add(start, field, f"the header has no column {' or '.join(map(repr, aliases))}; "
                               f"found {', '.join(map(repr, cells or []))}")
            cols = cols if cells is not None and issues.total == before else []
            continue
        if cols and cells is not None and len(cells) > len(cols):
            issues.add(start, None, f"row has {len(cells)} columns but the header has {len(cols)}")
            cells = None
        yield start, dict(zip(cols, cells)) if cols and cells is not None else None


def _field(rec: dict[str, Any], field: str, aliases: tuple[str, ...], line: int, cell: bool,
           names: tuple[str, ...] | None, max_chars: int, issues: _Issues) -> Any:
    """The checked value of ``field`` (for ``label``, an int or a name), or None once reported."""
    key = next((a for a in aliases if a in rec), None)
    value: Any = rec[key] if key else None
    if key is None:
        problem = f"missing field {' or '.join(map(repr, aliases))}"
    elif field == "label":
        value = value.strip() if isinstance(value, str) else value
        if cell and not (names and value in names) and _INT.fullmatch(str(value)):
            return int(value)  # a CSV/TSV cell that looks like an int is one
        if isinstance(value, (int, str)) and not isinstance(value, bool) and value != "" \
                and not (cell and _FLOAT.fullmatch(str(value))):
            return value
        problem = "is empty" if value == "" else \
            f"must be an integer or a name, got {value if cell else json.dumps(value)[:40]}"
    elif not isinstance(value, str):
        problem = f"must be a string, got {json.dumps(value)[:40]}"
    elif not value.strip():
        problem = "is empty"
    elif len(value) > max_chars:
        problem = f"is {len(value):,} characters, longer than max_text_chars={max_chars:,}"
    elif re.search("[\ud800-\udfff]", value):  # only JSON escapes can make unpaired surrogates
        problem = "contains an unpaired surrogate (invalid Unicode)"
    else:
        return value
    issues.add(line, key or field, problem)
    return None


def _map_labels(rows: list[tuple[int, str, Any]], given: tuple[str, ...] | None, issues: _Issues,
                ) -> tuple[list[int | None], tuple[str, ...] | None]:
    """The label index of each row (None where reported) and the label names."""
    raw = [v for _, _, v in rows]
    kind, names = type(raw[0]) if raw else int, given
    if given is None:
        keys = sorted({v for v in raw if type(v) is kind},  # numbers by value, then the other names
                      key=lambda k: (0, int(k), str(k)) if _INT.fullmatch(str(k)) else (1, 0, str(k)))
        names = None if kind is int and keys == list(range(len(keys))) else tuple(str(k) for k in keys)
        index: dict[Any, int] = {k: i for i, k in enumerate(keys)}
    else:
        index = {**{k: i for i, k in enumerate(given)}, **{i: i for i in range(len(given))}}
    out = [index.get(v) for v in raw]
    for (line, _, v), i in zip(rows, out):
        if i is None:
            issues.add(line, "label", f"labels mix integers and names (line {rows[0][0]} has {raw[0]!r})"
                       if given is None else f"unknown label {v!r}; expected one of {', '.join(given)}"
                       if isinstance(v, str) else f"label index {v} is out of range for {len(given)} names")
    return out, names
