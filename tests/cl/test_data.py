"""Scenarios and loaders: the embedded data, tiny files in each real format, clear errors, augmentations."""

import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sparsekern_cl.data import DatasetError, Preprocess, build_scenario, load_raw


# ----------------------------------------------------------------------------- embedded data
def test_mnist_subset_split_and_tasks():
    sc = build_scenario("mnist", n_tasks=5)
    assert sc.n_tasks == 5 and sc.classes_per_task == 2 and sc.input_shape == (1, 28, 28)
    assert [len(t) for t in sc.train] == [800] * 5 and [len(t) for t in sc.test] == [200] * 5
    assert sc.train[0].x.dtype == torch.uint8
    for t in range(5):
        assert set(sc.train[t].y.tolist()) == {2 * t, 2 * t + 1}
    # train and test are disjoint images
    tr = {bytes(x.numpy()) for x in sc.train[0].x}
    assert not any(bytes(x.numpy()) in tr for x in sc.test[0].x)
    again = build_scenario("mnist", n_tasks=5)
    assert torch.equal(again.train[3].x, sc.train[3].x)


def test_image_size_resizes_train_and_test():
    native = build_scenario("mnist", n_tasks=5)
    sc = build_scenario("mnist", n_tasks=5, image_size=32)
    assert sc.input_shape == (1, 32, 32) and sc.train[0].x.dtype == torch.uint8
    assert tuple(sc.test[4].x.shape[1:]) == (1, 32, 32) and len(sc.test[4]) == len(native.test[4])
    assert torch.equal(sc.train[2].y, native.train[2].y)
    # bilinear: the mean brightness of an image survives the resize
    a, b = native.train[1].x[:50].float().mean((1, 2, 3)), sc.train[1].x[:50].float().mean((1, 2, 3))
    assert torch.allclose(a, b, rtol=0.05, atol=1.0)
    same = build_scenario("mnist", n_tasks=5, image_size=28)  # the native size: untouched
    assert torch.equal(same.train[0].x, native.train[0].x)


def test_validation_split_comes_from_training_data():
    full = build_scenario("mnist", n_tasks=5)
    val = build_scenario("mnist", n_tasks=5, validation=0.1)
    assert val.eval_split == "val"
    assert [len(t) for t in val.train] == [720] * 5 and [len(t) for t in val.test] == [80] * 5
    train_imgs = {bytes(x.numpy()) for t in full.train for x in t.x}
    test_imgs = {bytes(x.numpy()) for t in full.test for x in t.x}
    val_imgs = [bytes(x.numpy()) for t in val.test for x in t.x]
    assert all(v in train_imgs for v in val_imgs) and not any(v in test_imgs for v in val_imgs)


def test_digits_and_class_orders():
    sc = build_scenario("digits", n_tasks=5, class_order="seeded", seed=3)
    assert sorted(sc.class_order) == list(range(10)) and sc.class_order != list(range(10))
    assert sum(len(t) for t in sc.train) + sum(len(t) for t in sc.test) == 1797
    explicit = build_scenario("digits", n_tasks=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert explicit.class_order[0] == 9
    with pytest.raises(ValueError, match="n_tasks"):
        build_scenario("digits", n_tasks=3)
    with pytest.raises(ValueError, match="class_order"):
        build_scenario("digits", n_tasks=5, class_order=[0, 1])


# ----------------------------------------------------------------------------- CIFAR
def _cifar_dict(n, n_classes, label_key, seed, every_class=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, n_classes, n)]
    if every_class:  # a scenario needs every class in the training labels
        labels = [int(v) for v in rng.permutation(np.arange(n) % n_classes)]
    return {b"data": data, label_key.encode(): labels, b"batch_label": b"x"}


def _write_cifar10_folder(root):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(_cifar_dict(6, 10, "labels", i), f)
    return d


def test_cifar10_folder_and_archive(tmp_path):
    d = _write_cifar10_folder(str(tmp_path / "a"))
    raw = load_raw("cifar10", str(tmp_path / "a"))
    assert raw.x_train.shape == (30, 3, 32, 32) and raw.x_test.shape == (6, 3, 32, 32)
    first = _cifar_dict(6, 10, "labels", 0)
    # rows are 1024 red, 1024 green, 1024 blue values, row-major
    assert torch.equal(raw.x_train[0, 1].flatten(), torch.from_numpy(first[b"data"][0, 1024:2048]))
    assert raw.y_train[:6].tolist() == first[b"labels"]
    assert raw.augment
    # the same files as the python archive
    arch = tmp_path / "b" / "cifar-10-python.tar.gz"
    arch.parent.mkdir()
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    raw2 = load_raw("cifar10", str(tmp_path / "b"))
    assert torch.equal(raw2.x_train, raw.x_train) and torch.equal(raw2.y_test, raw.y_test)
    sc = build_scenario("cifar10", n_tasks=5, data_dir=str(tmp_path / "b"))
    assert sc.input_shape == (3, 32, 32) and sum(len(t) for t in sc.train) == 30


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 100), ("test", 4)):
        with open(d / name, "wb") as f:
            pickle.dump(_cifar_dict(n, 100, "fine_labels", n, every_class=name == "train"), f)
    raw = load_raw("cifar100", str(tmp_path))
    assert raw.n_classes == 100 and raw.x_train.shape[0] == 100
    sc = build_scenario("cifar100", n_tasks=20, data_dir=str(tmp_path))
    assert sc.classes_per_task == 5


def test_cifar_errors_name_what_and_where(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz.*cifar-10-batches-py"):
        load_raw("cifar10", str(tmp_path))
    with pytest.raises(DatasetError, match="data_dir"):
        load_raw("cifar10", None)
    with pytest.raises(DatasetError, match="does not exist"):
        load_raw("cifar10", str(tmp_path / "nope"))
    d = _write_cifar10_folder(str(tmp_path / "t"))
    with open(os.path.join(d, "data_batch_3"), "r+b") as f:  # truncate one batch
        blob = f.read()
        f.seek(0)
        f.truncate()
        f.write(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="data_batch_3.*not a readable CIFAR pickle"):
        load_raw("cifar10", str(tmp_path / "t"))
    d2 = _write_cifar10_folder(str(tmp_path / "m"))
    with open(os.path.join(d2, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"test_batch.*\[N, 3072\]"):
        load_raw("cifar10", str(tmp_path / "m"))
    os.remove(os.path.join(d2, "data_batch_5"))
    with pytest.raises(DatasetError, match="data_batch_5"):
        load_raw("cifar10", str(tmp_path / "m"))
    bad = tmp_path / "z" / "cifar-10-python.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(DatasetError, match="truncated or not a tar archive"):
        load_raw("cifar10", str(tmp_path / "z"))


# ----------------------------------------------------------------------------- image folders
def _img(path, size, color, fmt):
    from PIL import Image

    arr = np.zeros((size[0], size[1], 3), np.uint8)
    arr[...] = color
    Image.fromarray(arr).save(path, format=fmt)


def _write_tiny(root):
    base = root / "tiny-imagenet-200"
    wnids = ["n01", "n02", "n03", "n04"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, w in enumerate(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(2):
            _img(d / f"{w}_{k}.JPEG", (64, 64), (40 * i, 10, 200), "JPEG")
        _img(base / "val" / "images" / f"val_{i}.JPEG", (64, 64), (40 * i, 10, 200), "JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tinyimagenet_layout(tmp_path):
    _write_tiny(tmp_path)
    raw = load_raw("tinyimagenet", str(tmp_path))
    assert raw.x_train.shape == (8, 3, 64, 64) and raw.x_test.shape == (4, 3, 64, 64)
    assert raw.y_train.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and raw.y_test.tolist() == [0, 1, 2, 3]
    assert abs(int(raw.x_train[2, 0, 5, 5]) - 40) <= 3  # JPEG keeps the colour closely
    sc = build_scenario("tinyimagenet", n_tasks=2, data_dir=str(tmp_path))
    assert sc.classes_per_task == 2


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match="wnids.txt"):
        load_raw("tinyimagenet", str(tmp_path))
    base = _write_tiny(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DatasetError, match="val_annotations.txt:1"):
        load_raw("tinyimagenet", str(tmp_path))
    (base / "train" / "n02" / "images" / "n02_0.JPEG").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="n02_0.JPEG: not a readable image"):
        load_raw("tinyimagenet", str(tmp_path))


def test_miniimagenet_class_folders(tmp_path):
    for i in range(4):
        d = tmp_path / f"n{i:02d}"
        d.mkdir()
        for k in range(6):
            _img(d / f"{k}.png", (30, 40), (60 * i, 0, 0), "PNG")
    raw = load_raw("miniimagenet", str(tmp_path))
    assert raw.x_train.shape == (20, 3, 84, 84) and raw.x_test.shape == (4, 3, 84, 84)  # 5 + 1 per class
    assert int(raw.x_test[3, 0, 40, 40]) == 180
    split = tmp_path / "split"
    for part, n in (("train", 3), ("test", 1)):
        for i in range(2):
            d = split / part / f"c{i}"
            d.mkdir(parents=True)
            for k in range(n):
                _img(d / f"{k}.jpg", (84, 84), (0, 90 * i, 0), "JPEG")
    raw2 = load_raw("miniimagenet", str(split))
    assert raw2.x_train.shape[0] == 6 and raw2.x_test.shape[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="one folder of images per class"):
        load_raw("miniimagenet", str(empty))


# ----------------------------------------------------------------------------- augmentation
def test_augmentations_train_only_and_seeded():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    pre = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, crop_padding=2)
    plain = (x.float() / 255 - 0.5) / 0.25
    assert torch.equal(pre(x, train=False), plain)  # never at test time
    a = pre(x, train=True, generator=torch.Generator().manual_seed(1))
    b = pre(x, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, plain)
    # every augmented image is a shifted and possibly mirrored copy: its pixels come from the original
    # (padding pixels are zeros, i.e. (0 - 0.5) / 0.25 after normalising)
    for i in range(16):
        vals = set(plain[i].flatten().tolist()) | {-2.0}
        assert set(a[i].flatten().tolist()) <= vals
    off = Preprocess((0.5,), (0.25,), augment=False)
    y = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(off(y, train=True, generator=torch.Generator()), off(y, train=False))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        load_raw("imagenet21k")


def _write_batch(root, name, d):
    with open(os.path.join(root, name), "wb") as f:
        pickle.dump(d, f)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("data_batch_2", {b"data": np.zeros((6, 3072), np.float32), b"labels": [0] * 6}, r"field 'data'.*uint8"),
        ("data_batch_2", {b"data": np.full((6, 3072), 300, np.int64), b"labels": [0] * 6}, r"field 'data'.*0\.\.255"),
        ("test_batch", {b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 3, 4, 10]}, r"'labels'.*0\.\.9"),
        ("test_batch", {b"data": np.zeros((6, 3072), np.uint8), b"labels": [-1] * 6}, r"'labels'.*0\.\.9"),
        ("data_batch_1", {b"data": np.zeros((6, 3072), np.uint8), b"labels": [0.5] * 6}, r"'labels'.*integer"),
        ("data_batch_4", {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, r"'data' holds no images"),
        ("data_batch_3", None, r"empty file"),
    ],
    ids=["float-data", "data-over-255", "label-too-big", "label-negative", "float-labels", "no-images", "empty"],
)
def test_bad_cifar_content_names_file_and_field(tmp_path, name, content, match):
    d = _write_cifar10_folder(str(tmp_path))
    if content is None:
        open(os.path.join(d, name), "wb").close()
    else:
        _write_batch(d, name, content)
    with pytest.raises(DatasetError, match=f"{name}.*{match}"):
        load_raw("cifar10", str(tmp_path))


def test_class_missing_from_a_task(tmp_path):
    d = _write_cifar10_folder(str(tmp_path))
    for i in range(1, 6):  # class 7 is nowhere in the training batches
        _write_batch(
            d, f"data_batch_{i}", {b"data": np.zeros((9, 3072), np.uint8), b"labels": [0, 1, 2, 3, 4, 5, 6, 8, 9]}
        )
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*no example of class 7, which task 3 needs"):
        build_scenario("cifar10", n_tasks=5, data_dir=str(tmp_path))
