"""Few-shot sampling (Dassl semantics), base-to-novel splits, averaging rules and templates."""
from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from clipheads.training.data.fewshot import few_shot_splits, sample_few_shot
from clipheads.training.data.records import DatasetSplits, Sample
from clipheads.training.data.templates import (
    COMMA_TEACHER_TEMPLATES,
    COOP_TEMPLATES,
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    templates_for,
)
from clipheads.training.protocols.splits import (
    base_novel_average,
    base_novel_split,
    harmonic_mean,
    subsample_classes,
)


def _samples(n_classes: int, per_class: int, prefix: str = "tr", interleave: bool = True) -> tuple[Sample, ...]:
    """Labels interleaved (0,1,2,0,1,2,...) unless told otherwise, like a shuffled split file."""
    pairs = [(i, y) for i in range(per_class) for y in range(n_classes)] if interleave else [
        (i, y) for y in range(n_classes) for i in range(per_class)]
    return tuple(Sample(f"/d/{prefix}_{y}_{i}.jpg", y, f"class {y}") for i, y in pairs)


def _splits(n_classes: int, train=20, val=6, test=5) -> DatasetSplits:
    return DatasetSplits(
        "toy", tuple(f"class {y}" for y in range(n_classes)),
        _samples(n_classes, train, "tr"), _samples(n_classes, val, "va"), _samples(n_classes, test, "te"),
    )


def _dassl_reference(data_sources, shots_list, seed):
    """Dassl's generate_fewshot_dataset, verbatim in spirit: global random seeded, sources in order."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for data, k in zip(data_sources, shots_list):
            tracker = defaultdict(list)
            for item in data:
                tracker[item.label].append(item)
            picked = []
            for items in tracker.values():
                picked.extend(random.sample(items, k) if len(items) >= k else items)
            out.append(tuple(picked))
        return out
    finally:
        random.setstate(state)


# ----------------------------------------------------------------------------- sampling


def test_same_seed_same_subset_and_k_per_class():
    data = _samples(5, 20)
    a, b = sample_few_shot(data, 4, seed=1), sample_few_shot(data, 4, seed=1)
    assert a == b and Counter(s.label for s in a) == {y: 4 for y in range(5)}
    assert len({s.path for s in a}) == 20  # without replacement


def test_different_seeds_give_different_subsets():
    data = _samples(5, 20)
    assert sample_few_shot(data, 4, seed=1) != sample_few_shot(data, 4, seed=2)


def test_fewer_than_k_takes_all():
    data = _samples(3, 2) + (Sample("/d/extra.jpg", 3, "class 3"),)
    out = sample_few_shot(data, 16, seed=1)
    assert sorted(s.path for s in out) == sorted(s.path for s in data)


def test_labels_in_order_of_first_appearance():
    data = tuple(reversed(_samples(4, 5, interleave=False)))  # label 3 appears first
    out = sample_few_shot(data, 2, seed=3)
    assert [s.label for s in out] == [3, 3, 2, 2, 1, 1, 0, 0]


def test_matches_dassl_global_random_stream_without_touching_it():
    ds = _splits(6)
    random.seed(12345)
    before = random.getstate()
    for seed in (1, 2, 3):
        ours = few_shot_splits(ds, 16, seed)
        ref_train, ref_val = _dassl_reference([ds.train, ds.val], [16, 4], seed)
        assert ours.train == ref_train and ours.val == ref_val
    assert random.getstate() == before


def test_few_shot_splits_counts_and_test_untouched():
    ds = _splits(4, train=20, val=6, test=5)
    few = few_shot_splits(ds, 8, seed=1)
    assert Counter(s.label for s in few.train) == {y: 8 for y in range(4)}
    assert Counter(s.label for s in few.val) == {y: 4 for y in range(4)}  # min(K, 4)
    assert few.test == ds.test and few.classnames == ds.classnames
    assert few.meta["shots"] == 8 and "shots" not in ds.meta
    assert Counter(s.label for s in few_shot_splits(ds, 2, 1).val) == {y: 2 for y in range(4)}


def test_zero_shots_means_full_data():
    ds = _splits(3)
    assert few_shot_splits(ds, 0, seed=1) is ds
    assert sample_few_shot(ds.train, 0, seed=1) == ds.train


def test_empty_val_consumes_nothing():
    ds = _splits(3)
    no_val = DatasetSplits(ds.name, ds.classnames, ds.train, (), ds.test)
    assert few_shot_splits(no_val, 4, 2).train == few_shot_splits(ds, 4, 2).train
    assert few_shot_splits(no_val, 4, 2).val == ()


# ----------------------------------------------------------------------------- base-to-novel


@pytest.mark.parametrize("n, base, novel", [(37, 19, 18), (10, 5, 5), (101, 51, 50), (1000, 500, 500), (397, 199, 198), (1, 1, 0)])
def test_ceil_rule(n, base, novel):
    b, nv = base_novel_split(_splits(n, train=1, val=1, test=1))
    assert (b.num_classes, nv.num_classes) == (base, novel)


def test_base_novel_relabels_every_split():
    ds = _splits(10, train=3, val=2, test=4)
    base, novel = base_novel_split(ds)
    assert base.classnames == tuple(f"class {y}" for y in range(5))
    assert novel.classnames == tuple(f"class {y}" for y in range(5, 10))
    for part, offset in ((base, 0), (novel, 5)):
        for s in (*part.train, *part.val, *part.test):
            assert 0 <= s.label < 5 and s.classname == f"class {s.label + offset}"
        assert (len(part.train), len(part.val), len(part.test)) == (15, 10, 20)
    assert base.meta["subset"] == "base" and novel.meta["subset"] == "new"
    assert subsample_classes(ds, "new") == novel and subsample_classes(ds, "all") is ds


def test_base_novel_uses_labels_present_in_train():
    ds = _splits(6, train=2, val=1, test=1)
    missing_4 = DatasetSplits(ds.name, ds.classnames, tuple(s for s in ds.train if s.label != 4), ds.val, ds.test)
    base, novel = base_novel_split(missing_4)  # train labels {0,1,2,3,5}: base = 0,1,2; novel = 3,5
    assert base.classnames == ("class 0", "class 1", "class 2")
    assert novel.classnames == ("class 3", "class 5")
    assert {s.classname for s in novel.test} == {"class 3", "class 5"}


def test_few_shot_happens_before_the_split():
    ds = _splits(37, train=20)
    base, novel = base_novel_split(few_shot_splits(ds, 16, seed=1))
    assert len(base.train) == 19 * 16 and len(novel.train) == 18 * 16


def test_harmonic_mean_and_average_row():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714, abs=1e-4)
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70  # CLIP's 11-dataset average row
    avg = base_novel_average([(90.0, 50.0), (70.0, 90.0)])
    assert (avg.base, avg.novel) == (80.0, 70.0)
    assert avg.hm == pytest.approx(harmonic_mean(80.0, 70.0))  # HM of means, not mean of HMs
    assert avg.hm != pytest.approx((harmonic_mean(90, 50) + harmonic_mean(70, 90)) / 2)
    with pytest.raises(ValueError):
        base_novel_average([])


# ----------------------------------------------------------------------------- templates


def test_template_tables():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES) and len(IMAGENET_TEMPLATES_SELECT) == 7
    assert all(t.count("{}") == 1 for t in (*IMAGENET_TEMPLATES, *COOP_TEMPLATES.values()))
    diff = {k for k in COOP_TEMPLATES if COOP_TEMPLATES[k] != COMMA_TEACHER_TEMPLATES[k]}
    assert diff == {"DescribableTextures"}


@pytest.mark.parametrize("name, single", [
    ("oxford_pets", "a photo of a {}, a type of pet."),
    ("OxfordPets", "a photo of a {}, a type of pet."),
    ("dtd", "{} texture."),
    ("eurosat", "a centered satellite photo of {}."),
    ("food101", "a photo of {}, a type of food."),
    ("ucf101", "a photo of a person doing {}."),
    ("fgvc_aircraft", "a photo of a {}, a type of aircraft."),
    ("imagenet_v2", "a photo of a {}."),
    ("my-own-data", "a photo of a {}."),
])
def test_templates_for_single(name, single):
    assert templates_for(name) == (single,)


def test_templates_for_other_kinds():
    assert templates_for("imagenet", "ensemble") == IMAGENET_TEMPLATES
    assert templates_for("imagenet", "select") == IMAGENET_TEMPLATES_SELECT
    assert templates_for("eurosat", "select") == IMAGENET_TEMPLATES_SELECT + ("a centered satellite photo of {}.",)
    assert templates_for("dtd", "comma_teacher") == ("a photo of a {}, a type of texture.",)
    assert templates_for("oxford_pets", "comma_teacher") == templates_for("oxford_pets")
    with pytest.raises(ValueError, match="unknown template kind"):
        templates_for("dtd", "fancy")


def test_train_crop_scale_reaches_the_loader_transform():
    """Dassl's RandomResizedCrop(0.08-1) by default; a recipe's `crop_scale` replaces it (the synthetic
    world's small objects are cut out by tiny crops)."""
    import torchvision.transforms as T

    from clipheads.training.backbone import PreprocessSpec
    from clipheads.training.data.loading import build_transform, make_loader
    from clipheads.training.loop import TrainConfig

    spec = PreprocessSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", resize_mode="shortest")

    def crop(transform):
        return next(t for t in transform.transforms if isinstance(t, T.RandomResizedCrop))

    assert crop(build_transform(spec, True)).scale == (0.08, 1.0)
    cfg = TrainConfig(**{"crop_scale": [0.8, 1.0]})
    loader = make_loader([None] * 8, spec, True, 4, crop_scale=tuple(cfg.crop_scale))  # never iterated
    assert crop(loader.dataset.transform).scale == (0.8, 1.0)
    assert not any(isinstance(t, T.RandomResizedCrop) for t in build_transform(spec, False).transforms)
