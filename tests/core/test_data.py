"""Tests for core.data: loading, validation, holdout split and JSONL writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import (
    MAX_ISSUES,
    TASKS,
    Dataset,
    DatasetSummary,
    Example,
    load_dataset,
    split_holdout,
    validate_file,
    write_jsonl,
)
from core.errors import DatasetFormatError, InvalidSpec

PROJECT = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("PFLAT_DATASETS") or Path(__file__).resolve().parents[3] / "shared/datasets")
needs_datasets = pytest.mark.skipif(
    not (DATASETS / "sst2").is_dir() or not (DATASETS / "e2e").is_dir(),
    reason=f"shared datasets not found at {DATASETS} (set PFLAT_DATASETS to the datasets folder)",
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def problems(path: Path, **kwargs: object) -> list[tuple[int | None, str | None]]:
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "invalid_dataset" and info.value.param == "file"
    return [(i.line, i.field) for i in info.value.issues]


# --- real files ---------------------------------------------------------------------------------------------


@needs_datasets
def test_sst2_train_first_rows() -> None:
    ds = load_dataset(DATASETS / "sst2" / "train.tsv", task="classification", max_rows=500)
    assert len(ds) == 500 and ds.task == "classification" and ds.label_names is None and ds.num_labels == 2
    assert {e.label for e in ds.examples} == {0, 1}
    assert ds.examples[0] == Example("hide new secretions from the parental units", label=0)
    assert not any(e.text.endswith("\r") for e in ds.examples)  # train.tsv has CRLF line ends


@needs_datasets
def test_sst2_dev_full() -> None:
    ds = load_dataset(DATASETS / "sst2" / "dev.tsv", task="classification")
    assert len(ds) == 872 and {e.label for e in ds.examples} == {0, 1} and ds.refs is None
    summary = validate_file(DATASETS / "sst2" / "dev.tsv", task="classification")
    assert isinstance(summary, DatasetSummary)
    assert (summary.rows, summary.label_counts, summary.label_names) == (872, (428, 444), None)
    assert 0 < summary.mean_text_chars < summary.max_text_chars


@needs_datasets
def test_e2e_devset_and_testset_refs() -> None:
    dev = load_dataset(DATASETS / "e2e" / "devset.csv", task="generation")
    assert len(dev) == 4672 and dev.label_names is None and dev.num_labels is None
    first = dev.examples[0]
    assert first.text == "name[Alimentum], area[city centre], familyFriendly[no]" and first.label is None
    assert first.completion and first.completion.startswith("There is a place in the city centre")
    test = load_dataset(DATASETS / "e2e" / "testset_w_refs.csv", task="generation")
    refs = test.refs
    assert refs is not None and len(test) == 4693 and len(refs) == 630
    assert sum(len(v) for v in refs.values()) == 4693 and max(len(v) for v in refs.values()) > 1
    assert refs[test.examples[0].text][:2] == [test.examples[0].completion, test.examples[1].completion]
    summary = validate_file(DATASETS / "e2e" / "testset_w_refs.csv", task="generation")
    assert summary.prompts == 630 and summary.label_counts is None and summary.max_text_chars > 0


# --- formats and labels -------------------------------------------------------------------------------------


def test_jsonl_string_labels_sorted_or_given(tmp_path: Path) -> None:
    rows = ({"text": "good", "label": "pos"}, "", {"sentence": "bad", "label": " neg "},
            {"content": "ok", "label": "pos"})
    path = write(tmp_path, "d.jsonl", jsonl(*rows))
    ds = load_dataset(path, task="classification")
    assert ds.label_names == ("neg", "pos") and [e.label for e in ds.examples] == [1, 0, 1]
    assert [e.text for e in ds.examples] == ["good", "bad", "ok"]
    ds = load_dataset(path, task="classification", label_names=["pos", "neg", "neutral"])
    assert ds.label_names == ("pos", "neg", "neutral") and [e.label for e in ds.examples] == [0, 1, 0]
    assert ds.num_labels == 3
    wrong = problems(path, task="classification", label_names=("neg", "positive"))
    assert wrong == [(1, "label"), (4, "label")]


def test_int_labels_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": -1},
                                            {"text": "c", "label": 10}))
    ds = load_dataset(path, task="classification")
    assert ds.label_names == ("-1", "1", "10") and [e.label for e in ds.examples] == [1, 0, 2]
    ds = load_dataset(path, task="classification", max_rows=2)
    assert len(ds) == 2 and ds.label_names == ("-1", "1")
    ok = write(tmp_path, "ok.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": 0}))
    ds = load_dataset(ok, task="classification", label_names=["neg", "pos"])
    assert ds.label_names == ("neg", "pos") and [e.label for e in ds.examples] == [1, 0]
    assert problems(path, task="classification", label_names=["neg", "pos"]) == [(2, "label"), (3, "label")]


def test_csv_and_tsv_details(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "d.csv", 'Text,label,x\r\n"multi\nline, quoted",pos,x\r\n\r\nplain,neg,y\r\n')
    ds = load_dataset(csv_path, task="classification")
    assert [(e.text, e.label) for e in ds.examples] == [("multi\nline, quoted", 1), ("plain", 0)]
    bad = write(tmp_path, "b.csv", 'text,label\n"multi\nline",2.5\nx,1,extra\n"a"b,1\nok,\n"open,1\n')
    assert problems(bad, task="classification") == [(2, "label"), (4, None), (5, None), (6, "label"),
                                                    (7, None)]
    tsv = write(tmp_path, "d.tsv", 'label\tsentence\n1\t"quoted" text , as is\n0\tb\n\n')
    assert load_dataset(tsv, task="classification").examples[0].text == '"quoted" text , as is'
    gen = write(tmp_path, "g.tsv", "mr\tref\tnotes\nm1\tr1\t\nm1\tr2\t\nm2\tr3\t\n")
    assert load_dataset(gen, task="generation").refs == {"m1": ["r1", "r2"], "m2": ["r3"]}


def test_csv_int_cells_index_label_names_and_json_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "label,text\n1,a\n0,b\npos,c\n")
    ds = load_dataset(path, task="classification", label_names=["neg", "pos"])
    assert [e.label for e in ds.examples] == [1, 0, 1]
    assert problems(path, task="classification") == [(4, "label")]  # ints and names mixed without names
    as_json = write(tmp_path, "d.json", jsonl({"text": "a", "label": 0}, {"text": "b", "label": 1}))
    assert len(load_dataset(as_json, task="classification", max_rows=5)) == 2
    assert len(load_dataset(path, task="classification", label_names=["neg", "pos"], max_rows=2)) == 2


def test_bool_label_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": True}, {"text": "b", "label": 0},
                                            {"text": "c", "label": 1}))
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, task="classification")
    assert [(i.line, i.field) for i in info.value.issues] == [(1, "label")]
    assert "got true" in info.value.issues[0].message


# --- every problem, all at once -----------------------------------------------------------------------------


def test_many_problems_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl(
        {"text": "fine", "label": 0},                 # 1
        '{"text": "broken", "label": ',             # 2 invalid JSON
        "[1, 2]",                                     # 3 not an object
        {"label": 1},                                 # 4 missing text
        {"text": "no label"},                         # 5 missing label
        {"text": "f", "label": 1.0},                  # 6 float
        {"text": "l", "label": [1]},                  # 7 list
        {"text": "n", "label": None},                 # 8 null
        {"text": 5, "label": 1},                      # 9 text not a string
        {"text": "   ", "label": 1},                  # 10 empty text
        "",                                           # 11 blank: skipped
        {"text": "x" * 101, "label": 1},              # 12 too long
        {"text": "a", "sentence": "b", "label": ""},  # 13 empty label; "text" wins over its alias
        {"text": "\ud800", "label": 1},               # 14 lone surrogate
        {"text": "fine too", "label": 1},             # 15
    ))
    assert problems(path, task="classification", max_text_chars=100) == [
        (2, None), (3, None), (4, "text"), (5, "label"), (6, "label"), (7, "label"), (8, "label"),
        (9, "text"), (10, "text"), (12, "text"), (13, "label"), (14, "text")]


def test_generation_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"prompt": "p", "completion": "c"}, {"mr": "p"},
                                            {"prompt": "", "ref": 3}))
    assert problems(path, task="generation") == [(2, "completion"), (3, "prompt"), (3, "ref")]
    header = write(tmp_path, "h.csv", "mr,completion_text\nm,r\n")
    assert problems(header, task="generation") == [(1, "completion")]


def test_missing_header_column(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text,labels\na,0\nb,1\n")
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, task="classification")
    [issue] = info.value.issues
    assert (issue.line, issue.field) == (1, "label") and "'labels'" in issue.message


def test_ten_megabyte_line(tmp_path: Path) -> None:
    big = json.dumps({"text": "x" * 10_000_000, "label": 1})
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 0}, big, {"text": "", "label": 1}))
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, task="classification")
    assert [(i.line, i.field) for i in info.value.issues] == [(2, None), (3, "text")]
    assert "max_line_bytes" in info.value.issues[0].message
    assert load_dataset(path, task="classification", max_line_bytes=20_000_000, max_text_chars=10_000_000,
                        max_rows=2).examples[1].label == 1


def test_non_utf8(tmp_path: Path) -> None:
    good = b'{"text": "caf\xc3\xa9", "label": 0}\n'
    path = write(tmp_path, "d.jsonl", good + b'{"text": "\xff\xfe", "label": 1}\n' + good.replace(b"0", b"1"))
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, task="classification")
    assert [(i.line, i.field) for i in info.value.issues] == [(2, None)]
    assert "UTF-8" in info.value.issues[0].message and "0xff" in info.value.issues[0].message
    utf16 = write(tmp_path, "u.csv", "text,label\na,0\n".encode("utf-16"))
    assert problems(utf16, task="classification") == [(1, None)]
    bom = write(tmp_path, "bom.csv", "\ufefftext,label\na,0\nb,1\n")
    assert len(load_dataset(bom, task="classification")) == 2


def test_unreadable_header_and_deep_json(tmp_path: Path) -> None:
    header = write(tmp_path, "h.csv", b"te\xffxt,label\na,0\nb,1\n")
    assert problems(header, task="classification") == [(1, None)]  # no spurious "missing column" issues
    deep = write(tmp_path, "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n" + jsonl({"text": "a", "label": 0}))
    assert problems(deep, task="classification") == [(1, None)]


def test_empty_inputs(tmp_path: Path) -> None:
    for name, content in [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("h.csv", "text,label\n"), ("e.tsv", "")]:
        assert problems(write(tmp_path, name, content), task="classification") == [(None, None)]
    with pytest.raises(DatasetFormatError):
        validate_file(write(tmp_path, "e2.jsonl", ""), task="generation")


def test_fewer_than_two_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}))
    assert problems(path, task="classification") == [(None, "label")]
    mixed = write(tmp_path, "m.jsonl", jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": 1}))
    assert problems(mixed, task="classification") == [(2, "label")]


def test_issue_cap(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", "not json\n" * (MAX_ISSUES + 500))
    with pytest.raises(DatasetFormatError) as info:
        load_dataset(path, task="classification")
    issues = info.value.issues
    assert len(issues) == MAX_ISSUES + 1 and [i.line for i in issues[:3]] == [1, 2, 3]
    assert issues[-1].line is None and f"{MAX_ISSUES + 500} in all" in str(issues[-1])


def test_bad_arguments(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 0}, {"text": "b", "label": 1}))
    assert TASKS == ("classification", "generation")
    for kwargs, param in [({"task": "regression"}, "task"),
                          ({"task": "classification", "max_rows": 0}, "max_rows"),
                          ({"task": "classification", "label_names": ["only"]}, "label_names"),
                          ({"task": "classification", "label_names": ["a", "a"]}, "label_names"),
                          ({"task": "generation", "label_names": ["a", "b"]}, "label_names")]:
        with pytest.raises(InvalidSpec) as info:
            load_dataset(path, **kwargs)  # type: ignore[arg-type]
        assert info.value.param == param
    assert problems(write(tmp_path, "d.txt", "x"), task="classification") == [(None, None)]


# --- split and write ----------------------------------------------------------------------------------------


def classification_dataset(n: int = 200) -> Dataset:
    examples = tuple(Example(f"text {i}", label=0 if i % 4 else 1) for i in range(n))  # 25% label 1
    return Dataset("classification", examples, ("neg", "pos"))


def test_split_holdout_deterministic_stratified_disjoint() -> None:
    ds = classification_dataset()
    train, hold = split_holdout(ds, fraction=0.2, seed=7)
    again = split_holdout(ds, fraction=0.2, seed=7)
    assert (train, hold) == again and split_holdout(ds, fraction=0.2, seed=8)[1] != hold
    assert len(hold) == 40 and len(train) == 160
    assert sum(e.label == 1 for e in hold.examples) == 10 and sum(e.label == 1 for e in train.examples) == 40
    assert not set(train.examples) & set(hold.examples)
    assert sorted(e.text for e in train.examples + hold.examples) == sorted(e.text for e in ds.examples)
    assert list(train.examples) == [e for e in ds.examples if e in set(train.examples)]  # file order kept
    assert train.label_names == hold.label_names == ("neg", "pos")
    with pytest.raises(InvalidSpec):
        split_holdout(ds, fraction=1.0, seed=0)


def test_split_holdout_generation_keeps_prompts_together() -> None:
    examples = tuple(Example(f"mr {i // 3}", completion=f"ref {i}") for i in range(60))
    train, hold = split_holdout(Dataset("generation", examples, None), fraction=0.25, seed=1)
    assert len(train) + len(hold) == 60 and 12 <= len(hold) <= 18
    assert not set(train.refs or {}) & set(hold.refs or {})
    e2e = DATASETS / "e2e" / "testset_w_refs.csv"
    if e2e.is_file():
        train, hold = split_holdout(load_dataset(e2e, task="generation"), fraction=0.1, seed=0)
        assert 350 < len(hold) < 600 and not set(train.refs or {}) & set(hold.refs or {})
    one_prompt = Dataset("generation", tuple(Example("p", completion=str(i)) for i in range(10)), None)
    assert [len(d) for d in split_holdout(one_prompt, fraction=0.3, seed=0)] == [7, 3]


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    text = 'é "x"\nnew\ttab'
    named = Dataset("classification", (Example(text, label=1), Example("b", label=0)), ("zed", "alpha"))
    write_jsonl(named, tmp_path / "n.jsonl")
    first = (tmp_path / "n.jsonl").read_text("utf-8").splitlines()[0]
    assert json.loads(first) == {"text": text, "label": "alpha"}
    assert load_dataset(tmp_path / "n.jsonl", task="classification", label_names=named.label_names) == named
    bare = classification_dataset(10)
    bare = Dataset("classification", bare.examples, None)
    write_jsonl(bare, tmp_path / "b.jsonl")
    assert load_dataset(tmp_path / "b.jsonl", task="classification") == bare
    gen = Dataset("generation", (Example("p", completion="c1"), Example("p", completion="c2")), None)
    write_jsonl(gen, tmp_path / "g.jsonl")
    assert load_dataset(tmp_path / "g.jsonl", task="generation") == gen
    assert not list(tmp_path.glob("*.tmp"))


def test_import_does_not_load_torch() -> None:
    code = "import sys, core.data; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
