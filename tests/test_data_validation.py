"""Bad CSVs fail in ``build_datasets``, before any model exists, with the message described in
docs/datasets.md; run under a memory limit so that a blow-up fails the test, not the machine."""
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fastfair.data import (
    CSVImageDataset, DataError, DataWarning, build_datasets, validate_dataset, validate_splits,
)
from fastfair.data.csv_dataset import _encode
from fastfair.data.images import SAMPLE_SIZE, check_image_files, verify_mode

HEADER = "path,label,group,split"
GOOD = [f"{i}.png,{i % 2},{(i // 2) % 2},{s}" for i, s in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)]


def make_images(root, n=8):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def truncated(path, fmt):
    """An image whose header opens but whose pixel data stops half-way."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:  # the header alone looks fine: only decoding finds the fault
        assert im.size == (64, 64)
    return path


def lines_with(*replace, extra=()):
    """GOOD with rows replaced ({index: row}) and extra rows appended."""
    rows = list(GOOD)
    for index, row in replace:
        rows[index] = row
    return "\n".join([HEADER, *rows, *extra]) + "\n"


# name -> (CSV text or bytes, build_datasets options)
CASES = {
    "billion_label": (lines_with((1, "1.png,1000000000,1,train")), {}),
    "ten_million_label": (lines_with((3, "3.png,10000000,1,train")), {}),
    "huge_group_2_40": (lines_with((2, "2.png,0,1099511627776,train")), {}),
    "thirty_bad_labels": (lines_with(extra=[f"0.png,{10**9 + i},0,test" for i in range(30)]), {}),
    "negative_group": (lines_with((5, "5.png,1,-3,val")), {}),
    "single_class": ("\n".join([HEADER] + [f"{i}.png,0,{i % 2},{'train' if i < 4 else 'test'}" for i in range(6)]
                               + ["6.png,1,0,val"]) + "\n", {}),
    "two_label_columns": ("path,label,group,split,label\n" + "\n".join(r + ",0" for r in GOOD) + "\n", {}),
    "mixed_label": (lines_with((4, "4.png,cat,0,val")), {}),
    "missing_files": (lines_with((1, "gone1.png,1,0,train"), (6, "gone2.png,0,1,test"), (7, "sub/gone3.png,1,1,test")), {}),
    "broken_images": (lines_with((2, "trunc.png,0,1,train"), (5, "trunc.jpg,1,0,val"), (6, "corrupt.png,0,1,test")), {}),
    "latin1": (lines_with((2, "caf\u00e9.png,0,1,train")).encode("latin-1"), {}),
    "dotdot": (lines_with((3, "../secret.png,1,1,train")), {}),
    "absolute": (lines_with((3, "/etc/passwd,1,1,train")), {}),
    "unknown_split": (lines_with((6, "6.png,0,1,holdout")), {}),
    "declared_billion": (lines_with(), {"num_classes": 10**9}),
    "image_size_zero": (lines_with(), {"image_size": 0}),
    "image_size_huge": (lines_with(), {"image_size": 10**6}),
    "bad_verify_option": (lines_with(), {"verify_images": "yes"}),
    "leaks_dups_typo": ("\n".join([
        HEADER, "0.png,0,young,train", "1.png,1,young,train", "2.png,0,old,train", "3.png,1,old,train",
        "4.png,0,young,val", "5.png,1,old,val", "0.png,0,old,test", "7.png,1,yuong,test",
        "1.png,1,young,train", "1.png,0,young,train"]) + "\n", {}),
}

# Runs every case in one fresh interpreter whose address space is capped at what the imports
# took plus 2 GiB; after a successful build it allocates the classifier head the trainer would
# (num_classes outputs), so data that asks for a billion classes fails here, not in training.
RUNNER = r"""
import json, resource, sys, warnings
import torch
from fastfair.data import build_datasets
spec = json.load(open(sys.argv[1]))
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.RLIM_INFINITY))
out = {}
for name, opts in spec.items():
    rec = {"error": None, "message": None, "warnings": [], "num_classes": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = build_datasets(data="csv", **opts)
            rec["num_classes"] = ds["train"].num_classes
            torch.nn.Linear(192, ds["train"].num_classes)
        except BaseException as e:
            rec["error"], rec["message"] = type(e).__name__, str(e)
            rec["is_value_error"] = isinstance(e, ValueError)
    rec["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    out[name] = rec
try:  # the control: what a billion-class head does under this limit
    torch.nn.Linear(192, 10**9)
    out["control"] = None
except BaseException as e:
    out["control"] = f"{type(e).__name__}: {e}"
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_csvs")
    root = make_images(tmp / "img")
    truncated(root / "trunc.png", "PNG")
    truncated(root / "trunc.jpg", "JPEG")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "corrupt.png")
    data = bytearray((root / "corrupt.png").read_bytes())
    data[data.find(b"IDAT") + 6] ^= 0xFF  # a broken data stream behind a valid header
    (root / "corrupt.png").write_bytes(bytes(data))
    (tmp / "secret.png").write_bytes((root / "0.png").read_bytes())
    spec = {}
    for name, (text, opts) in CASES.items():
        path = tmp / f"{name}.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        spec[name] = {"csv_path": str(path), "image_root": str(root), "image_size": 8, **opts}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # glibc reserves 64 MB of address space per thread otherwise
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "spec.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text()), spec


def error_of(outcomes, name):
    rec = outcomes[0][name]
    assert rec["error"] == "DataError" and rec["is_value_error"], rec
    assert rec["num_classes"] is None  # nothing was returned, so no model could be built
    return rec["message"]


@pytest.mark.parametrize("name,value,line", [
    ("billion_label", "1000000000", 3), ("ten_million_label", "10000000", 5), ("huge_group_2_40", "1099511627776", 4),
])
def test_huge_labels_and_groups_fail_with_the_row_and_the_value_as_written(outcomes, name, value, line):
    msg = error_of(outcomes, name)
    column = "group" if "group" in name else "label"
    assert f"{name}.csv: column '{column}'" in msg
    assert f"may not exceed the 8 rows" in msg and msg.endswith(f"1 row: line {line} ({value})")
    assert "2147483647" not in msg


def test_many_bad_rows_list_the_first_20_and_the_count(outcomes):
    msg = error_of(outcomes, "thirty_bad_labels")
    assert "out of range in 30 rows: line 10 (1000000000), line 11 (1000000001)" in msg
    assert msg.count("line ") == 20 and msg.endswith("line 29 (1000000019) (first 20 of 30 shown)")


@pytest.mark.parametrize("name,expected", [
    ("negative_group", "column 'group' must hold integers 0..K-1 (K = max + 1 may not exceed the 8 rows of the CSV; "
                       "pass num_groups to declare more); out of range in 1 row: line 7 (-3)"),
    ("single_class", "the train split has rows of one class only (0, all 4 rows): training needs at least two"),
    ("two_label_columns", "line 1: duplicate column names 'label' (columns [2, 5])"),
    ("mixed_label", "column 'label' mixes integers and strings: integers in 7 rows: line 2 ('0'),"),
    ("unknown_split", "unknown split in column 'split'"),
    ("declared_billion", "num_classes must be None or an integer in [1, 1048576], got 1000000000"),
    ("image_size_zero", "image_size must be an integer in [1, 4096], got 0"),
    ("image_size_huge", "image_size must be an integer in [1, 4096], got 1000000"),
    ("bad_verify_option", "verify_images must be one of ('auto', 'full', 'sample', 'none') (or True/False), got 'yes'"),
])
def test_bad_csv_fails_before_the_model_with_a_named_error(outcomes, name, expected):
    assert expected in error_of(outcomes, name)


def test_missing_files_are_listed_at_once(outcomes):
    msg = error_of(outcomes, "missing_files")
    assert "image files not found, 3 files: line 3: " in msg
    assert all(f in msg for f in ("gone1.png", "line 8: ", "gone2.png", "line 9: ", "gone3.png"))


def test_images_that_fail_only_when_decoded_are_all_listed(outcomes):
    msg = error_of(outcomes, "broken_images")
    assert "images that cannot be decoded, 3 files: line 4: " in msg
    for line, name in ((4, "trunc.png"), (7, "trunc.jpg"), (8, "corrupt.png")):
        assert f"line {line}: " in msg and name in msg


def test_non_utf8_csv_names_the_file_and_line(outcomes):
    msg = error_of(outcomes, "latin1")
    assert "latin1.csv line 4: not UTF-8 (byte 0xe9 at column 4)" in msg


@pytest.mark.parametrize("name,shown", [("dotdot", "'../secret.png'"), ("absolute", "'/etc/passwd'")])
def test_paths_outside_the_image_root_are_refused(outcomes, name, shown):
    msg = error_of(outcomes, name)
    assert "outside image_root" in msg and "allow_outside_root=True" in msg and msg.endswith(f"1 row: line 5 ({shown})")


def test_the_memory_limit_catches_a_blow_up(outcomes):
    # the control for every case above: a billion-class head, asked for explicitly, fails in the
    # capped process instead of taking the machine's memory
    control = outcomes[0]["control"]
    assert control is not None and "memory" in control.lower(), control


def test_leaks_duplicates_and_a_group_typo_are_warnings_with_counts(outcomes):
    rec = outcomes[0]["leaks_dups_typo"]
    assert rec["error"] is None and rec["num_classes"] == 2, rec
    text = {cat: [m for c, m in rec["warnings"] if c == cat] for cat in ("DataWarning",)}["DataWarning"]
    assert any("duplicated rows: the same image twice in one split (1 with another label or group), 2 rows: "
               "line 10 repeats line 3" in m for m in text), text
    assert any("the same image in two splits (evaluation on training images): 1 image: " in m
               and "0.png in train (line 2) and test (line 8)" in m for m in text), text
    assert any("groups with rows in val/test but none in train" in m and "'yuong' (1 row, first" in m
               and "did you mean 'young'?" in m for m in text), text


# -- in-process checks of the options ------------------------------------------------------------
@pytest.fixture
def good_csv(tmp_path):
    make_images(tmp_path / "img")
    p = tmp_path / "meta.csv"
    p.write_text(lines_with())
    return p


def test_allow_outside_root_accepts_what_is_otherwise_refused(tmp_path, good_csv):
    (tmp_path / "secret.png").write_bytes((tmp_path / "img" / "0.png").read_bytes())
    p = tmp_path / "out.csv"
    p.write_text(lines_with((3, "../secret.png,1,1,train"), (5, f"{tmp_path / 'img' / '5.png'},1,0,val")))
    with pytest.raises(DataError, match="outside image_root"):
        build_datasets(data="csv", csv_path=p, image_root=tmp_path / "img", image_size=8)
    out = build_datasets(data="csv", csv_path=p, image_root=tmp_path / "img", image_size=8, allow_outside_root=True)
    assert out["train"].paths[3] == str(tmp_path / "secret.png")
    # an absolute path inside the root is fine without the option
    assert out["val"].paths[1] == str(tmp_path / "img" / "5.png")


@pytest.mark.parametrize("option,mode", [
    (True, "full"), (False, "none"), ("auto", "full"), ("sample", "sample"), ("none", "none"), ("full", "full")])
def test_verify_modes_and_their_legacy_spellings(option, mode):
    assert verify_mode(option, 10) == mode
    assert verify_mode("auto", 100_000) == "sample" and verify_mode("auto", 99_999) == "full"


def test_none_checks_existence_and_sample_decodes_a_seeded_subset(tmp_path):
    root = make_images(tmp_path / "img", n=2)
    truncated(root / "bad.png", "PNG")
    files = {str(root / "0.png"): "line 2", str(root / "bad.png"): "line 3", str(root / "x.png"): "line 4"}
    (none,) = check_image_files(files, "none", "m.csv")
    assert none.startswith("m.csv: image files not found, 1 file: line 4: ")
    full = check_image_files(files, "full", "m.csv")
    assert len(full) == 2 and "cannot be decoded, 1 file: line 3: " in full[1]
    assert check_image_files(files, "sample", "m.csv") == full  # below SAMPLE_SIZE: every file


def test_sample_mode_decodes_only_the_sample(tmp_path, monkeypatch):
    import fastfair.data.images as images

    decoded = []
    monkeypatch.setattr(images, "decode_error", lambda p: decoded.append(p))
    files = {str(tmp_path / f"{i}.png"): f"line {i}" for i in range(SAMPLE_SIZE + 50)}
    for p in files:
        open(p, "wb").close()
    assert images.check_image_files(files, "sample", "m.csv", progress=False) == []
    first = sorted(decoded)
    assert len(first) == SAMPLE_SIZE and len(set(first)) == SAMPLE_SIZE
    decoded.clear()
    images.check_image_files(files, "sample", "m.csv", progress=False)
    assert sorted(decoded) == first  # seeded: the same sample every run


def test_legacy_true_false_still_accepted_by_validate_dataset(good_csv):
    ds = CSVImageDataset(good_csv, good_csv.parent / "img", split="train", image_size=8)
    for option in (True, False, "none", "sample"):
        validate_dataset(ds, verify_images=option)


def test_validate_splits_on_colored_digits_and_a_one_class_train_split():
    from fastfair.data import ColoredDigits

    splits = {s: ColoredDigits(s, binary=True, image_size=8) for s in ("train", "val", "test")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_splits(splits)
    one = ColoredDigits("train", binary=True, image_size=8)
    one.labels = torch.zeros_like(one.labels)
    one.groups = one.colors.clone()
    with pytest.raises(DataError, match=r"one class only \('digit>=5', all \d+ rows\)"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_splits({**splits, "train": one})
    said = [str(w.message) for w in caught]
    assert any(m.startswith("labels with rows in val/test but none in train") and "1 label: 'digit<5'" in m
               for m in said), said
    # a built-in benchmark leaves groups out of training on purpose: no warning for them
    assert not any(m.startswith("groups with rows") for m in said), said


def test_unseen_groups_in_integer_columns_are_reported_without_a_spelling_hint(tmp_path):
    make_images(tmp_path / "img")
    p = tmp_path / "m.csv"
    p.write_text(lines_with((7, "7.png,1,2,test")))
    with pytest.warns(DataWarning, match=r"groups with rows in val/test but none in train .*1 group: 2 \(1 row, "
                                         r"first .*m\.csv line 9 .*7\.png\)\)$"):
        build_datasets(data="csv", csv_path=p, image_size=8, image_root=tmp_path / "img")


@given(st.lists(st.integers(-3, 40), min_size=1, max_size=30))
def test_integer_columns_are_accepted_exactly_when_they_are_0_to_k_minus_1_with_k_at_most_the_rows(values):
    lines = list(range(2, len(values) + 2))
    bad = [line for v, line in zip(values, lines) if not 0 <= v < len(values)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        if bad:
            with pytest.raises(DataError) as e:
                _encode([str(v) for v in values], lines, "label", "num_classes", None, "m.csv")
            assert f"out of range in {len(bad)} row" in str(e.value)
            assert [int(x) for x in re.findall(r"line (\d+) \(", str(e.value))] == bad[:20]
        else:
            codes, k, names = _encode([str(v) for v in values], lines, "label", "num_classes", None, "m.csv")
            assert codes == values and k == max(values) + 1 and names == [str(i) for i in range(k)]


def test_string_labels_are_numbered_in_sorted_order_whatever_the_row_order(tmp_path):
    values = ["dog", "cat", "Ému", "ant", "cat"]
    codes, k, names = _encode(values, [2, 3, 4, 5, 6], "label", "num_classes", None, "m.csv")
    assert names == ["ant", "cat", "dog", "Ému"] and k == 4 and codes == [2, 1, 3, 0, 1]
    again = _encode(values[::-1], [2, 3, 4, 5, 6], "label", "num_classes", None, "m.csv")
    assert again[2] == names
