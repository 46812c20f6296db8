"""CIFAR python-version loading on tiny batches written in the archives' own pickle format."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from training.data.cifar import CifarFormatError, load_cifar

# The pure-Python pickler: unlike the C one its per-type dispatch table can be extended.
_PurePickler: Any = pickle._Pickler


class _Py2Pickler(_PurePickler):
    """Writes what Python 2's cPickle wrote: every str/bytes as a BINSTRING, numpy.core names.

    The real CIFAR files were produced that way, so the loader is tested against the opcodes it
    will meet, not just against what Python 3 happens to write today.
    """

    dispatch: ClassVar[dict[type, Any]] = dict(_PurePickler.dispatch)

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _write_py2(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _planes(n: int, seed: int) -> np.ndarray:
    """`n` images whose R, G and B planes are distinguishable: R < 100 <= G < 200 <= B."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 100, (n, 1024))
    g = rng.integers(100, 200, (n, 1024))
    b = rng.integers(200, 256, (n, 1024))
    return np.concatenate([r, g, b], axis=1).astype(np.uint8)  # the archive's row layout


def _write_cifar10(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_py2(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    rows = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = _planes(per_batch, seed=i)
        labels = [(i + j) % 10 for j in range(per_batch)]
        _write_py2(
            d / name,
            {
                b"batch_label": f"batch {i}".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        rows[name] = data
        rows[name + "/labels"] = np.array(labels)
    return rows


def _write_cifar100(root: Path) -> np.ndarray:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine = [f"fine{i}".encode() for i in range(100)]
    _write_py2(d / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    for split, n in (("train", 4), ("test", 2)):
        _write_py2(
            d / split,
            {
                b"data": _planes(n, seed=n),
                b"fine_labels": [99 - k for k in range(n)],
                b"coarse_labels": [0] * n,  # must not be used
                b"filenames": [b"x.png"] * n,
                b"batch_label": split.encode(),
            },
        )
    return _planes(4, seed=4)


def test_cifar10_train_joins_five_batches_in_order(tmp_path: Path) -> None:
    rows = _write_cifar10(tmp_path)
    images, labels, names = load_cifar(tmp_path / "cifar-10-batches-py", train=True)
    assert images.dtype == np.uint8 and images.shape == (15, 3, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (15,)
    assert names[0] == "airplane" and names[9] == "truck" and len(names) == 10
    expected = np.concatenate([rows[f"data_batch_{k}/labels"] for k in range(1, 6)])
    np.testing.assert_array_equal(labels, expected)
    first = rows["data_batch_1"][0]
    np.testing.assert_array_equal(images[0, 0].ravel(), first[:1024])


def test_channel_order_is_red_green_blue_row_major(tmp_path: Path) -> None:
    rows = _write_cifar10(tmp_path)
    images, _, _ = load_cifar(tmp_path, train=False)  # parent directory is accepted
    raw = rows["test_batch"]
    assert images.shape == (3, 3, 32, 32)
    assert images[:, 0].max() < 100 and images[:, 1].min() >= 100 and images[:, 1].max() < 200
    assert images[:, 2].min() >= 200
    # Pixel (row 1, col 2) of the green plane is raw index 1024 + 1 * 32 + 2.
    assert images[2, 1, 1, 2] == raw[2, 1024 + 32 + 2]
    assert images[2, 2, 31, 0] == raw[2, 2048 + 31 * 32]


def test_cifar100_uses_fine_labels_and_names(tmp_path: Path) -> None:
    expected = _write_cifar100(tmp_path)
    images, labels, names = load_cifar(tmp_path, train=True)
    assert images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(images.reshape(4, -1), expected)
    assert labels.tolist() == [99, 98, 97, 96]
    assert len(names) == 100 and names[99] == "fine99"
    test_images, test_labels, _ = load_cifar(tmp_path / "cifar-100-python", train=False)
    assert test_images.shape == (2, 3, 32, 32) and test_labels.tolist() == [99, 98]


def test_python3_pickles_with_str_keys_also_load(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a", "b", "c"]}))
    (d / "test").write_bytes(pickle.dumps({"data": _planes(2, 0), "fine_labels": [2, 0]}))
    _, labels, names = load_cifar(d, train=False)
    assert names == ["a", "b", "c"] and labels.tolist() == [2, 0]


def test_missing_directory_and_unrecognized_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar(tmp_path / "absent", train=True)
    with pytest.raises(FileNotFoundError, match=r"not a CIFAR directory.*cifar-10-batches-py"):
        load_cifar(tmp_path, train=True)


def test_both_archives_in_one_parent_is_ambiguous(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    _write_cifar100(tmp_path)
    with pytest.raises(ValueError, match="both"):
        load_cifar(tmp_path, train=True)


def test_missing_training_batch_is_named(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4 is missing"):
        load_cifar(tmp_path, train=True)


def test_truncated_file_is_a_format_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CifarFormatError, match="test_batch: not a readable CIFAR pickle"):
        load_cifar(tmp_path, train=False)


def test_wrong_row_size_and_out_of_range_labels(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_py2(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(CifarFormatError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar(tmp_path, train=False)
    _write_py2(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(CifarFormatError, match=r"labels outside 0\.\.9"):
        load_cifar(tmp_path, train=False)
    _write_py2(path, {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(CifarFormatError, match="no 'labels' entry"):
        load_cifar(tmp_path, train=False)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_pickles_that_call_other_globals_are_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(CifarFormatError, match=r"refusing to load builtins\.print"):
        load_cifar(tmp_path, train=False)
