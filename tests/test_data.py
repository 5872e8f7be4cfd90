"""afm_ray.data: real embedded datasets, CIFAR pickles and Parquet written in the real layouts, the loader."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from afm_ray.data import DATASETS, DeviceBatchLoader, ImageDataset, load_dataset
from afm_ray.safe_pickle import UnsafePickleError


def _check_dataset(d: ImageDataset, shape: tuple[int, int, int], n_train: int, n_test: int, num_classes: int) -> None:
    assert d.image_shape == shape
    assert d.x_train.shape == (n_train, *shape) and d.x_test.shape == (n_test, *shape)
    assert d.x_train.dtype == d.x_test.dtype == torch.uint8
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    assert d.num_classes == num_classes
    assert 0 <= int(d.y_train.min()) and int(d.y_train.max()) < num_classes
    pixels = d.x_train.double() / 255
    assert d.mean == pytest.approx(tuple(pixels.mean(dim=(0, 2, 3)).tolist()))
    assert d.std == pytest.approx(tuple(pixels.std(dim=(0, 2, 3)).tolist()))
    assert len(d.mean) == len(d.std) == shape[0]


# ---------------------------------------------------------------------------------------------
# embedded datasets


def test_digits_split_and_scale() -> None:
    d = load_dataset("digits")
    _check_dataset(d, (1, 8, 8), 1438, 359, 10)
    assert int(d.x_train.max()) == 255  # 0..16 rescaled to 0..255
    # the split is a permutation of sklearn's data: every image appears exactly once
    ref = load_digits()
    ref_x = np.rint(ref.images * 255 / 16).astype(np.uint8)
    ours = torch.cat([d.x_train, d.x_test])[:, 0].numpy()
    ours_y = torch.cat([d.y_train, d.y_test]).numpy()
    key = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y, strict=True))  # noqa: E731
    assert key(ours, ours_y) == key(ref_x, ref.target)


def test_seeded_split_is_deterministic() -> None:
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_test, c.y_test)
    assert len(load_dataset("digits", test_fraction=0.5).y_test) == round(0.5 * 1797)


def test_mnist5k_layout() -> None:
    d = load_dataset("mnist5k")
    _check_dataset(d, (1, 28, 28), 4000, 1000, 10)
    y = torch.cat([d.y_train, d.y_test])
    # the label is the last CSV column: 500 of each digit (the first column is a blank corner pixel)
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    x = torch.cat([d.x_train, d.x_test]).double()
    assert int(x[:, 0, 0, 0].max()) == 0 and int(x.max()) == 255
    assert d.mean[0] == pytest.approx(0.1307, abs=0.01)  # MNIST's well-known pixel mean
    # row-major 28x28, not transposed: the mean "1" is a tall vertical stroke
    ones = x[y == 1, 0].mean(0)
    rows_inked = int((ones.mean(1) > 20).sum())
    cols_inked = int((ones.mean(0) > 20).sum())
    assert rows_inked > 2 * cols_inked


def test_mnist5k_pad_to_32() -> None:
    d28, d32 = load_dataset("mnist5k"), load_dataset("mnist5k", image_size=32)
    _check_dataset(d32, (1, 32, 32), 4000, 1000, 10)
    assert torch.equal(d32.x_train[:, :, 2:30, 2:30], d28.x_train)
    border = d32.x_train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0
    assert torch.equal(d32.y_test, d28.y_test)


def test_resize_down() -> None:
    d = load_dataset("mnist5k", image_size=14)
    _check_dataset(d, (1, 14, 14), 4000, 1000, 10)


def test_mnist5k_root_override_and_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "mnist_5k.csv.gz"
    import gzip

    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(ValueError, match=r"mnist_5k\.csv\.gz.*785"):
        load_dataset("mnist5k", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("mnist5k", str(tmp_path / "nope.csv.gz"))


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"'mnist'.*digits.*mnist5k.*cifar10.*cifar100.*parquet"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        load_dataset("digits", test_fraction=1.5)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    assert DATASETS == ("digits", "mnist5k", "cifar10", "cifar100", "parquet")


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _fake_cifar10(parent: Path, n: int = 4, n_test: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        _write_pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"labels": y, b"data": x, b"filenames": []})
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in rng.integers(0, 10, n_test)]
    _write_pickle(folder / "test_batch", {b"labels": yt, b"data": xt})
    return np.concatenate(xs), ys, xt, yt


def test_cifar10_round_trip(tmp_path: Path) -> None:
    x, y, xt, yt = _fake_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        d = load_dataset("cifar10", str(root))
        _check_dataset(d, (3, 32, 32), 20, 3, 10)
        assert torch.equal(d.x_train.reshape(20, 3072), torch.from_numpy(x))
        assert d.y_train.tolist() == y and d.y_test.tolist() == yt
        assert torch.equal(d.x_test.reshape(3, 3072), torch.from_numpy(xt))
    # channel-major rows: the first 1024 bytes are the red plane of a row-major image
    assert torch.equal(d.x_train[0, 0, 0, :], torch.from_numpy(x[0, :32]))
    assert torch.equal(d.x_train[0, 1, 1, :], torch.from_numpy(x[0, 1024 + 32 : 1024 + 64]))


def test_cifar100_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    xt = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    _write_pickle(folder / "train", {b"data": x, b"fine_labels": [0, 99, 5, 6, 7, 8], b"coarse_labels": [0] * 6})
    _write_pickle(folder / "test", {b"data": xt, b"fine_labels": [42, 1], b"coarse_labels": [0] * 2})
    d = load_dataset("cifar100", str(tmp_path))
    _check_dataset(d, (3, 32, 32), 6, 2, 100)
    assert d.y_train.tolist() == [0, 99, 5, 6, 7, 8] and d.y_test.tolist() == [42, 1]
    assert torch.equal(d.x_test.reshape(2, 3072), torch.from_numpy(xt))


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}.*cifar-10-batches-py.*data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 not found in .*cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train, test not found.*cifar-100-python.*fine_labels"):
        load_dataset("cifar100", str(tmp_path))


def test_cifar_malformed(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _write_pickle(batch, {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0] * 4})
    with pytest.raises(ValueError, match=r"data_batch_2 has keys .*needs b'data' and b'labels'"):
        load_dataset("cifar10", str(tmp_path))
    _write_pickle(batch, {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4})
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' is uint8 \(4, 1024\).*\(N, 3072\)"):
        load_dataset("cifar10", str(tmp_path))
    batch.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR python pickle"):
        load_dataset("cifar10", str(tmp_path))


def _py2_pickle(obj: object) -> bytes:
    """`obj` pickled the way Python 2's cPickle wrote the official CIFAR batches: protocol 2,
    str (bytes) as BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct."""
    import struct

    class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose opcodes can be chosen
        dispatch = dict(pickle._Pickler.dispatch)

        def save_bytes(self, obj: bytes) -> None:
            head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING
            self.write(head if len(obj) < 256 else head + struct.pack("<i", len(obj)))
            self.write(obj)
            self.memoize(obj)

        dispatch[bytes] = save_bytes

        def save_global(self, obj: object, name: str | None = None) -> None:
            module = {"_reconstruct": "numpy.core.multiarray"}.get(obj.__name__, obj.__module__)
            self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
            self.memoize(obj)

        dispatch[type] = save_global

    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["python2", "protocol-2", "protocol-latest"])
def test_real_cifar_pickles_load_through_the_restricted_unpickler(tmp_path: Path, fmt: str) -> None:
    """Batches in the official layout (dict with b'data' uint8 (N, 3072), b'labels', b'batch_label',
    b'filenames'), written as Python 2 did and by numpy 2 with old and new protocols, all load."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, 3)],
            b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
            b"filenames": [b"a.png", b"b.png", b"c.png"],
        }
        dump = {"python2": _py2_pickle, "protocol-2": lambda b: pickle.dumps(b, protocol=2)}.get(
            fmt, lambda b: pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL)
        )
        (folder / name).write_bytes(dump(batch))
        batches[name] = batch
    if fmt == "python2":  # the file holds what Python 2 wrote: the numpy 1 module name, no _codecs
        raw = (folder / "test_batch").read_bytes()
        assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    d = load_dataset("cifar10", str(tmp_path))
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert torch.equal(d.x_train.reshape(15, 3072), torch.from_numpy(np.concatenate([b[b"data"] for b in train])))
    assert d.y_train.tolist() == [y for b in train for y in b[b"labels"]]
    assert d.y_test.tolist() == batches["test_batch"][b"labels"]


class _Payload:
    def __init__(self, call: object, *args: object):
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


@pytest.mark.parametrize("gadget", ["os.system", "builtins.exec", "subprocess.Popen", "builtins.getattr"])
def test_crafted_cifar_pickle_is_refused_before_it_runs(tmp_path: Path, gadget: str) -> None:
    """A batch that runs a command when unpickled: plain pickle.load runs it (the file really is
    an attack), load_dataset refuses it by name and the command never runs."""
    import os
    import subprocess

    marker = tmp_path / "marker"
    payload = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.getattr": _Payload(getattr, 1, "real"),  # harmless, but getattr reaches anything
    }[gadget]
    _fake_cifar10(tmp_path)
    crafted = pickle.dumps({b"data": payload, b"labels": [0]})
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(crafted)
    refused = {"os.system": "posix.system"}.get(gadget, gadget)
    with pytest.raises(UnsafePickleError, match=rf"data_batch_3: refused to unpickle {re.escape(refused)}: a CIFAR"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()
    if gadget != "builtins.getattr":  # the control: unrestricted, the same bytes run the command
        pickle.loads(crafted)
        deadline = __import__("time").monotonic() + 10
        while not marker.exists() and __import__("time").monotonic() < deadline:  # Popen runs in the background
            __import__("time").sleep(0.05)
        assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Parquet


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _digits_u8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.rint(d.images[:60] * 255 / 16).astype(np.uint8), d.target[:60].astype(np.int64)


def _hub_table(
    images: np.ndarray,
    labels: np.ndarray,
    image_col: str = "image",
    label_col: str = "label",
    struct: bool = True,
    metadata: dict | None = None,
) -> pa.Table:
    blobs = [_png(a) for a in images]
    if struct:
        img = pa.array(
            [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        img = pa.array(blobs, type=pa.binary())
    table = pa.table({image_col: img, label_col: pa.array(labels, type=pa.int64())})
    return table.replace_schema_metadata(metadata) if metadata else table


def test_parquet_hub_layout_local_and_uri(tmp_path: Path) -> None:
    x, y = _digits_u8()
    (tmp_path / "data").mkdir()
    pq.write_table(_hub_table(x[:40], y[:40]), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(_hub_table(x[40:], y[40:]), tmp_path / "data" / "test-00000-of-00001.parquet")
    for root in (str(tmp_path), tmp_path.as_uri()):
        assert root.startswith("file://") or root.startswith("/")
        d = load_dataset("parquet", root)
        _check_dataset(d, (1, 8, 8), 40, 20, 10)
        assert torch.equal(d.x_train[:, 0], torch.from_numpy(x[:40]))  # PNG is lossless
        assert torch.equal(d.x_test[:, 0], torch.from_numpy(x[40:]))
        assert d.y_train.tolist() == y[:40].tolist()
    assert load_dataset("parquet", str(tmp_path), image_size=12).image_shape == (1, 12, 12)


def test_parquet_rgb_img_fine_label_raw_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    y = np.arange(10) * 11  # CIFAR-100-like fine labels
    meta = {b"huggingface": json.dumps(
        {"info": {"features": {"fine_label": {"names": [str(i) for i in range(100)], "_type": "ClassLabel"}}}}
    ).encode()}  # fmt: skip
    for split, rows in (("train", slice(0, 6)), ("test", slice(6, 10))):
        table = _hub_table(x[rows], y[rows], "img", "fine_label", struct=False, metadata=meta)
        pq.write_table(table, tmp_path / f"{split}.parquet")
    d = load_dataset("parquet", str(tmp_path))
    _check_dataset(d, (3, 32, 32), 6, 4, 100)  # num_classes from the hub ClassLabel, not max label + 1
    assert torch.equal(d.x_train, torch.from_numpy(x[:6]).permute(0, 3, 1, 2))


def test_parquet_single_file_is_split(tmp_path: Path) -> None:
    x, y = _digits_u8()
    path = tmp_path / "all.parquet"
    pq.write_table(_hub_table(x, y), path)
    d = load_dataset("parquet", str(path), test_fraction=0.25, seed=3)
    _check_dataset(d, (1, 8, 8), 45, 15, 10)
    assert torch.equal(d.y_test, load_dataset("parquet", path.as_uri(), test_fraction=0.25, seed=3).y_test)


def test_parquet_errors(tmp_path: Path) -> None:
    missing = re.escape(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=rf"{missing} does not exist.*train\*\.parquet"):
        load_dataset("parquet", str(tmp_path / "missing"))
    x, y = _digits_u8()
    pq.write_table(_hub_table(x[:40], y[:40]), tmp_path / "train.parquet")
    with pytest.raises(FileNotFoundError, match=r"no test split among Parquet files \['train.parquet'\].*test\*\."):
        load_dataset("parquet", str(tmp_path))
    pq.write_table(pa.table({"pixels": [b"x"], "target": [1]}), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test\.parquet has columns \['pixels', 'target'\], no image column.*'img'"):
        load_dataset("parquet", str(tmp_path))
    pq.write_table(_hub_table(x[40:], y[40:], label_col="target"), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"columns \['image', 'target'\], no label column.*'label', 'fine_label'"):
        load_dataset("parquet", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# DeviceBatchLoader


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel encodes the sample index (n <= 256) so batches can be traced back."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    x[:, 0, 3, 3] = 255
    return x, torch.arange(n) % 10


def _epoch_indices(loader: DeviceBatchLoader) -> list[int]:
    out = []
    for xb, _ in loader:
        out += [round(v * 255) for v in xb[:, 0, 0, 0].tolist()]
    return out


def test_loader_shards_are_disjoint_and_equal() -> None:
    x, y = _indexed(103)
    loaders = [DeviceBatchLoader(x, y, 10, device="cpu", rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 5  # 51 per rank, drop_last
    a, b = (_epoch_indices(ld) for ld in loaders)
    assert len(a) == len(b) == 50
    assert not set(a) & set(b)
    assert len(set(a)) == 50 and len(set(b)) == 50
    # without drop_last every sample is seen and the ranks still get the same number of batches
    full = [DeviceBatchLoader(x, y, 10, device="cpu", rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert len(full[0]) == len(full[1]) == 6
    seen = _epoch_indices(full[0]) + _epoch_indices(full[1])
    assert len(seen) == 104 and set(seen) == set(range(103))


def test_loader_set_epoch_reshuffles_deterministically() -> None:
    x, y = _indexed(64)
    ld = DeviceBatchLoader(x, y, 8, device="cpu", seed=1)
    e0 = _epoch_indices(ld)
    assert _epoch_indices(ld) == e0  # same epoch, same order
    ld.set_epoch(1)
    e1 = _epoch_indices(ld)
    assert e1 != e0 and sorted(e1) == sorted(e0) == list(range(64))
    other = DeviceBatchLoader(x, y, 8, device="cpu", seed=1)
    other.set_epoch(1)
    assert _epoch_indices(other) == e1
    assert _epoch_indices(DeviceBatchLoader(x, y, 8, device="cpu", shuffle=False)) == list(range(64))


def test_loader_batches_float_on_device() -> None:
    d = load_dataset("digits")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ld = DeviceBatchLoader(d.x_train, d.y_train, 128, device=device)
    assert len(ld) == 1438 // 128
    n = 0
    for xb, yb in ld:
        assert xb.device.type == device.type and yb.device.type == device.type
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.shape == (128, 1, 8, 8) and yb.shape == (128,)
        assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
        n += 1
    assert n == len(ld)
    # the labels travel with their images
    xb, yb = next(iter(DeviceBatchLoader(d.x_train, d.y_train, 1438, device=device, shuffle=False)))
    assert torch.equal(yb.cpu(), d.y_train)
    assert torch.allclose(xb.cpu(), d.x_train.float() / 255)


def test_loader_errors() -> None:
    x, y = _indexed(10)
    with pytest.raises(ValueError, match="batch_size=16"):
        DeviceBatchLoader(x, y, 16, device="cpu")
    with pytest.raises(ValueError, match="rank=2"):
        DeviceBatchLoader(x, y, 2, device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="y has 9"):
        DeviceBatchLoader(x, y[:9], 2, device="cpu")


def test_check_available_lists_files_without_reading_images(tmp_path):
    from afm_ray.data import check_available

    check_available("digits")
    check_available("mnist5k")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        check_available("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="needs root="):
        check_available("cifar100", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_available("parquet", str(tmp_path / "nowhere"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not read by the check")
    check_available("cifar10", str(tmp_path))  # present: the check lists, it does not unpickle
