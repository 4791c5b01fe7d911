"""Loading a dataset or a checkpoint never runs code from the file."""

import os
import pickle

import numpy as np
import pytest
import torch

from sparsekern_cl.data import DatasetError, load_raw
from sparsekern_cl.runner import load_checkpoint


class _Payload:
    """Unpickling this calls os.system, which writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _batch(n, seed, protocol=pickle.HIGHEST_PROTOCOL):
    rng = np.random.default_rng(seed)
    d = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"batch_label": b"x",
        b"filenames": [b"a.png"] * n,
    }
    return pickle.dumps(d, protocol=protocol)


def _write_folder(root, blobs):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    for name, blob in blobs.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(blob)


NAMES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_of_any_protocol_still_load(tmp_path, protocol):
    _write_folder(str(tmp_path), {n: _batch(4, i, protocol) for i, n in enumerate(NAMES)})
    raw = load_raw("cifar10", str(tmp_path))
    assert raw.x_train.shape == (20, 3, 32, 32)


def test_cifar_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    blobs = {n: _batch(4, i) for i, n in enumerate(NAMES)}
    blobs["data_batch_2"] = pickle.dumps({b"data": _Payload(marker), b"labels": [0]})
    _write_folder(str(tmp_path / "d"), blobs)
    with pytest.raises(DatasetError, match=r"data_batch_2.*os.*system.*not allowed"):
        load_raw("cifar10", str(tmp_path / "d"))
    assert not marker.exists()


def test_checkpoint_payload_does_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": {}, "state": {"x": _Payload(marker)}, "model": {}, "strategy": {}}, path)
    with pytest.raises(ValueError, match="not a readable sparsekern_cl checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage that is not a checkpoint", None])
def test_bad_checkpoint_files_raise_naming_the_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:  # a real checkpoint, truncated
        torch.save({"config": {}, "state": {}, "model": {"w": torch.randn(100, 100)}, "strategy": {}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_checkpoint(str(path))


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(str(path))
