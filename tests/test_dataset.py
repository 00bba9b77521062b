"""XrayDataset, the decode-once cache and the transforms, on small generated films."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cxrkit.data.cache import DecodeCache
from cxrkit.data.dataset import UnreadableLog, XrayDataset, collate_skip_bad, load_prepared
from cxrkit.data.layout import Sample, load_source
from cxrkit.data.transforms import ModelInput, eval_transform, train_transform
from cxrkit.models import ModelSpec, create_model
from cxrkit.training.datamodule import EpochOrder, balanced_weights
from tests.conftest import make_kaggle_tree, synthetic_film

SIZE = 32
CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    """12 readable training films and one corrupt file in the middle."""
    root = make_kaggle_tree(tmp_path / "data", {"train": 6, "test": 1}, size=(50, 40))
    corrupt = root / "train" / "NORMAL" / "IM-0099-0000.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return load_source(root).split("train")


def corrupt_index(samples: list[Sample]) -> int:
    return next(i for i, s in enumerate(samples) if "IM-0099" in s.path)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def test_loader_skips_a_corrupt_file(samples):
    dataset = XrayDataset(samples, CLASSES, SIZE, eval_transform(create_model(
        "simple_cnn", pretrained=False).spec))
    assert dataset[corrupt_index(samples)] is None
    seen = []
    for x, y, idx in DataLoader(dataset, batch_size=5, collate_fn=collate_skip_bad):
        assert x.shape[1:] == (1, SIZE, SIZE) and x.dtype == torch.float32
        assert [samples[i].label for i in idx] == [list(CLASSES)[c] for c in y]
        seen += idx.tolist()
    assert sorted(seen) == [i for i in range(len(samples)) if i != corrupt_index(samples)]


def test_collate_of_only_bad_items_is_none():
    assert collate_skip_bad([None, None]) is None


def test_cache_gives_the_same_pixels_and_marks_the_bad_file(samples, tmp_path):
    cache = DecodeCache(samples, SIZE, cache_dir=tmp_path / "cache", workers=2)
    bad = corrupt_index(samples)
    assert cache[bad] is None
    for i, s in enumerate(samples):
        if i != bad:
            assert torch.equal(cache[i], load_prepared(s.path, SIZE, False))
    cached = XrayDataset(samples, CLASSES, SIZE, identity, cache=cache)
    direct = XrayDataset(samples, CLASSES, SIZE, identity)
    assert all(torch.equal(cached[i][0], direct[i][0]) for i in range(len(samples)) if i != bad)


def test_cache_is_reused_not_rebuilt(samples, tmp_path):
    first = DecodeCache(samples, SIZE, cache_dir=tmp_path / "cache", workers=1)
    stat = os.stat(first.array_path)
    second = DecodeCache(samples, SIZE, cache_dir=tmp_path / "cache", workers=1)
    assert second.array_path == first.array_path
    after = os.stat(second.array_path)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1


def test_cache_key_follows_size_preprocessing_and_file_changes(samples, tmp_path):
    cache_dir = tmp_path / "cache"
    base = DecodeCache(samples, SIZE, cache_dir=cache_dir, workers=1)
    assert DecodeCache(samples, SIZE + 8, cache_dir=cache_dir, workers=1).array_path != \
        base.array_path
    assert DecodeCache(samples, SIZE, True, cache_dir=cache_dir, workers=1).array_path != \
        base.array_path

    changed = samples[0].path
    # rewritten in place at the very same size (BMP, DICOM and raw exports are fixed-size):
    # only the modification time tells
    synthetic_film("PNEUMONIA", 12345).save(changed, format="BMP")
    base = DecodeCache(samples, SIZE, cache_dir=cache_dir, workers=1)
    size = os.stat(changed).st_size
    synthetic_film("NORMAL", 54321).save(changed, format="BMP")
    st = os.stat(changed)
    assert st.st_size == size
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later modification
    fresh = DecodeCache(samples, SIZE, cache_dir=cache_dir, workers=1)
    assert fresh.array_path != base.array_path
    assert torch.equal(fresh[0], load_prepared(changed, SIZE, False))
    assert not torch.equal(fresh[0], base[0])


@pytest.mark.parametrize("spec", [
    create_model("simple_cnn", pretrained=False).spec,
    ModelSpec("rgb", 2, input_size=SIZE, in_chans=3, mean=(0.485, 0.456, 0.406),
              std=(0.229, 0.224, 0.225)),
], ids=["simple_cnn", "rgb"])
def test_transforms_give_the_model_its_channels_size_and_normalisation(spec):
    pixels = torch.full((1, spec.input_size, spec.input_size), 200, dtype=torch.uint8)
    x = eval_transform(spec)(pixels)
    assert x.shape == (spec.in_chans, spec.input_size, spec.input_size)
    assert x.dtype == torch.float32
    expected = (200 / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    y = train_transform(spec)(pixels)
    assert y.shape == x.shape and y.dtype == torch.float32


def test_train_augmentation_varies_and_eval_does_not():
    spec = create_model("simple_cnn", pretrained=False).spec
    size = (spec.input_size, spec.input_size)  # what `prepare` hands the transforms
    film = np.array(synthetic_film("PNEUMONIA", 0, size))
    pixels = torch.from_numpy(film)[None]
    train, evaluate = train_transform(spec), eval_transform(spec)
    torch.manual_seed(0)
    views = [train(pixels) for _ in range(3)]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert torch.equal(evaluate(pixels), evaluate(pixels))
    # augmentation perturbs the film, it does not replace it
    assert torch.corrcoef(torch.stack([views[0].ravel(), evaluate(pixels).ravel()]))[0, 1] > 0.5


@pytest.mark.parametrize("augment", [False, True], ids=["eval", "train"])
def test_finishing_a_batch_on_the_device_equals_finishing_each_image(augment):
    """What training does (workers stop before ModelInput, the device finishes the batch)
    gives exactly the tensors that finishing every image in the worker gives."""
    spec = create_model("efficientnet_lite0", pretrained=False).spec  # 3 channels, mean 0.5
    size = (spec.input_size, spec.input_size)
    films = [torch.from_numpy(np.array(synthetic_film(label, i, size)))[None]
             for i, label in enumerate(["NORMAL", "PNEUMONIA"] * 2)]
    make = train_transform if augment else eval_transform
    finished, unfinished = make(spec), make(spec, finish=False)
    torch.manual_seed(0)
    whole = torch.stack([finished(f) for f in films])
    torch.manual_seed(0)
    grey = torch.stack([unfinished(f) for f in films])
    assert grey.shape == (4, 1, *size)  # a third of the channels to hand over
    assert grey.dtype == (torch.float32 if augment else torch.uint8)  # uint8: a twelfth
    assert whole.shape == (4, 3, *size)
    assert torch.equal(ModelInput(spec)(grey), whole)


def test_an_epoch_order_is_drawn_from_seed_and_epoch_alone_and_can_start_part_way():
    from cxrkit.training.datamodule import EpochOrder

    order = EpochOrder(20, seed=3)
    order.set_epoch(2)
    whole = list(order)
    assert sorted(i for i, _ in whole) == list(range(20))  # a permutation
    assert list(EpochOrder(20, seed=3)) != whole  # epoch 0: another order
    torch.manual_seed(123)  # nothing global matters
    again = EpochOrder(20, seed=3)
    again.set_epoch(2)
    again.start = 8
    assert list(again) == whole[8:]


def test_a_film_with_a_seed_is_augmented_the_same_whatever_ran_before(samples):
    spec = create_model("simple_cnn", pretrained=False).spec
    dataset = XrayDataset(samples, CLASSES, SIZE, train_transform(spec))
    first = dataset[(0, 42)][0]
    torch.rand(1000)  # the global generator moves on
    assert torch.equal(dataset[(0, 42)][0], first)
    assert not torch.equal(dataset[(0, 43)][0], first)


def test_the_balanced_sampler_draws_classes_equally():
    """data.balanced_sampler turns the class weights off: it must balance by itself."""
    labels = [0] * 90 + [1] * 10
    assert balanced_weights([0, 0, 0, 1]).tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    drawn = [labels[i] for i, _ in EpochOrder(len(labels), 0, balanced_weights(labels))]
    assert 0.35 < np.mean(drawn) < 0.65


def test_the_unreadable_log_reads_each_film_once_and_passes_over_cut_lines(tmp_path):
    """Loader workers append to it; a line cut by a full disk raised at the stage's end,
    after the stage had trained, and again on every resume."""
    file = tmp_path / ".unreadable-train.csv"
    UnreadableLog(file, "train").add("/films/a.png")
    UnreadableLog(file, "val").add("/films/b, with a comma.png")
    UnreadableLog(file, "train").add("/films/a.png")  # another worker, another epoch
    with open(file, "a", encoding="utf-8") as f:
        f.write("trai")  # cut short
    assert UnreadableLog.read(file) == {"train": ["/films/a.png"],
                                        "val": ["/films/b, with a comma.png"]}
    assert UnreadableLog.read(tmp_path / "none.csv") == {}
