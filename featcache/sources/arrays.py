"""Sources held in memory: Keras' CIFAR-10 download, the CIFAR-10 python release, and .npz files.

Each becomes uint8 NHWC pixels with int64 labels. The python release is read with a restricted
unpickler that accepts only what its batches hold; .npz files are loaded with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from featcache.errors import BadInputError, DownloadError, first_line
from featcache.sources.dataset import Dataset, Split, existing

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")



def load_keras_cifar10(_: str = "") -> Dataset:
    """CIFAR-10 through `keras.datasets.cifar10.load_data()` (downloads ~170 MB once)."""
    import keras

    try:
        with contextlib.redirect_stdout(sys.stderr):   # Keras prints its download progress on stdout
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:  # Keras wraps every network failure in a bare Exception
        raise DownloadError(
            f"could not download CIFAR-10 ({e}); this machine seems offline; fix: pass a local copy "
            "with --data PATH (an image folder ROOT/{train,test}/<class>/, a cifar-10-batches-py "
            "folder or cifar-10-python.tar.gz, or an .npz)") from e
    return _from_arrays("cifar10", "cifar10", x_train, y_train, x_test, y_test, CIFAR10_CLASSES)


def load_npz(path: str) -> Dataset:
    """An .npz holding x_train, y_train, x_test, y_test and optionally class_names."""
    file = existing(path)
    arrays = _read_npz(file)
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"{file}: y_{split} must hold integer labels 0..n_classes-1, got {y.dtype} "
                                "(strings or NaN are not labels); fix: map class names to integers and pass the "
                                "names as class_names")
    names = arrays.get("class_names")
    if names is not None and names.ndim != 1:
        raise BadInputError(f"{file}: class_names must be a 1-d array of names, got shape {names.shape}")
    class_names = tuple(str(c) for c in names) if names is not None else _numbered_classes(file, arrays)
    return _from_arrays(file.stem, f"npz:{file}", arrays["x_train"], arrays["y_train"],
                        arrays["x_test"], arrays["y_test"], class_names, where=str(file))


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of .npz `file`, refused in one line naming it if it is no .npz archive of the four arrays."""
    try:
        z = np.load(file, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):   # np.save's single array under an .npz name
            raise BadInputError(f"{file} holds a single array, expected an .npz archive of x_train, y_train, "
                                "x_test, y_test; fix: save with np.savez")
        with z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise BadInputError(f"{file} lacks {sorted(missing)}; expected arrays x_train, y_train, "
                                    "x_test, y_test (and optionally class_names)")
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{file} holds object arrays or is not a valid .npz ({e}); expected "
                            "plain numeric arrays; fix: save with np.savez and numeric dtypes") from e
    except (zipfile.BadZipFile, zlib.error) as e:   # a damaged or foreign file that starts like a zip archive
        raise BadInputError(f"cannot read {file} as .npz ({first_line(e)}); expected a zip archive written by "
                            "np.savez; fix: save it again with np.savez") from e
    except (OSError, EOFError) as e:
        raise BadInputError(f"cannot read {file} as .npz ({e})") from e


def _numbered_classes(file: Path, arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Class names "0".."k-1" for labels that come without names. k is at most the number of rows: one stray label
    of 10**8 would otherwise name 10**8 classes (gigabytes) before anything else is checked."""
    rows = arrays["y_train"].size + arrays["y_test"].size
    top = -1
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if not y.size:
            continue
        low, high = int(y.min()), int(y.max())   # Python ints: a uint64 label does not wrap round
        if low < 0 or high >= rows:
            raise BadInputError(f"{file}: y_{split} must hold labels 0..k-1 with k at most the {rows} rows, got "
                                f"labels {low}..{high}; fix: number the classes from 0, or pass class_names")
        top = max(top, high)
    return tuple(str(i) for i in range(top + 1))


def load_cifar_python(path: str) -> Dataset:
    """The original CIFAR-10 python release: a cifar-10-batches-py folder or its .tar.gz."""
    file = existing(path)
    if file.is_dir():
        def read(name: str) -> bytes:
            member = file / name
            if not member.is_file():
                raise BadInputError(f"{member} is missing; expected data_batch_1..5, test_batch and "
                                    "batches.meta in a cifar-10-batches-py folder")
            return member.read_bytes()
        batches = {name: read(name) for name in _CIFAR_FILES}
    else:
        try:
            with tarfile.open(file, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                batches = {}
                for name in _CIFAR_FILES:
                    if name not in members:
                        raise BadInputError(f"{file} has no {name}; expected the cifar-10-python.tar.gz release")
                    batches[name] = tar.extractfile(members[name]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadInputError(f"cannot read {file} as a tar archive ({first_line(e)}); expected "
                                "cifar-10-python.tar.gz or a cifar-10-batches-py folder") from e

    def parts(names):
        xs, ys = [], []
        for name in names:
            d = _unpickle_cifar(batches[name], f"{file}:{name}")
            data, labels = d.get(b"data"), d.get(b"labels")
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3072 and isinstance(labels, list) and len(labels) == len(data)):
                raise BadInputError(f"{file}:{name} is not a CIFAR-10 batch; expected b'data' uint8 "
                                    "(n, 3072) and b'labels' a list of n ints")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(labels))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = parts([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = parts(["test_batch"])
    meta = _unpickle_cifar(batches["batches.meta"], f"{file}:batches.meta")
    names = meta.get(b"label_names")
    if not (isinstance(names, list) and all(isinstance(n, bytes) for n in names)):
        raise BadInputError(f"{file}:batches.meta has no list of label_names")
    return _from_arrays("cifar10", f"cifar-py:{file}", x_train, y_train, x_test, y_test,
                        tuple(n.decode() for n in names), where=str(file))



_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, ints and numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}   # how protocol-2 pickles written by Python 3 spell bytes

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle_cifar(payload: bytes, where: str) -> dict:
    try:
        d = _CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise BadInputError(f"{where} is not a CIFAR-10 python batch ({e}); only numpy arrays, lists "
                            "and bytes are accepted") from e
    if not isinstance(d, dict):
        raise BadInputError(f"{where} is not a CIFAR-10 python batch; expected a dict, got {type(d).__name__}")
    return d


def _from_arrays(name, source, x_train, y_train, x_test, y_test, class_names, where="arrays") -> Dataset:
    splits = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 1):   # grayscale -> RGB
            x = np.repeat(x.reshape(x.shape[:3] + (1,)), 3, axis=-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape[1:3]:   # no pixel: no feature
            raise BadInputError(f"{where}: x_{split} must be uint8 pixels (n, h, w, 3) with h, w >= 1, got "
                                f"{x.dtype} {x.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"{where}: y_{split} must hold integer labels, got {y.dtype}")
        y = y.reshape(-1)
        if len(y) != len(x):
            raise BadInputError(f"{where}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(y) == 0:
            raise BadInputError(f"{where}: the {split} split is empty")
        if int(y.min()) < 0 or int(y.max()) >= len(class_names):   # checked before int64, where uint64 wraps round
            raise BadInputError(f"{where}: y_{split} has labels outside 0..{len(class_names) - 1}")
        y = y.astype(np.int64)
        splits[split] = Split(labels=y, pixels=x)
    return Dataset(name=name, source=source, train=splits["train"], test=splits["test"],
                   class_names=tuple(class_names), fingerprint="")

