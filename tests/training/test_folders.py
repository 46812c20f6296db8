"""Image-folder loading: layout rules, the service's decoder, and errors that name the problem."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isomax.contract.decode import decode_uint8
from training.data.folders import default_preprocess, find_images, load_image_folder


def _save(path: Path, value: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _save(root / "dog" / "a.png", 200)
    _save(root / "dog" / "b.JPG", 10)
    _save(root / "dog" / "nested" / "c.bmp", 30, mode="L")
    _save(root / "cat" / "x.webp", 90)
    _save(root / "cat" / ".hidden.png", 1)
    _save(root / "cat" / ".ipynb_checkpoints" / "y.png", 1)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".git").mkdir()
    (root / "README.md").write_text("files in the root are not classes")
    return root


def test_classes_are_sorted_and_hidden_or_non_image_files_skipped(tree: Path) -> None:
    paths, labels, classes = find_images(tree)
    assert classes == ["cat", "dog"]
    assert [p.relative_to(tree).as_posix() for p in paths] == [
        "cat/x.webp",
        "dog/a.png",
        "dog/b.JPG",
        "dog/nested/c.bmp",
    ]
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 1, 1]


def test_images_are_decoded_exactly_as_the_service_does(tree: Path) -> None:
    spec = default_preprocess(16, 12, "RGB")
    images, labels, classes = load_image_folder(tree, spec)
    assert labels.tolist() == [0, 1, 1, 1] and classes == ["cat", "dog"]
    assert images.dtype == np.uint8 and images.shape == (4, 3, 16, 12)
    paths, _, _ = find_images(tree)
    for img, path in zip(images, paths, strict=True):
        np.testing.assert_array_equal(img, decode_uint8(path.read_bytes(), spec))
    # Gray-scale source in an RGB model and color sources in a gray model both convert.
    gray = load_image_folder(tree, default_preprocess(8, 8, "L"))[0]
    assert gray.shape == (4, 1, 8, 8)
    assert int(images[1, 0, 0, 0]) == 200  # dog/a.png, red channel


def test_default_preprocess_derives_channels_and_accepts_overrides() -> None:
    spec = default_preprocess(32, 32, "RGB", resize_mode="center_crop")
    assert spec.channels == 3 and spec.resize_mode == "center_crop"
    assert default_preprocess(28, 28).channels == 1


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", default_preprocess(8, 8))


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_image_folder(tmp_path / "f.png", default_preprocess(8, 8))


def test_no_class_directories(tmp_path: Path) -> None:
    _save(tmp_path / "loose.png", 3)
    with pytest.raises(FileNotFoundError, match=r"no class directories.*<class>/<image>"):
        load_image_folder(tmp_path, default_preprocess(8, 8))


def test_class_directory_without_images_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", 3)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"b has no images \(accepted extensions: .*\.png"):
        load_image_folder(tmp_path, default_preprocess(8, 8))


def test_undecodable_file_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", 3)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode image"):
        load_image_folder(tmp_path, default_preprocess(8, 8))


def test_alpha_and_16bit_files_go_through_the_service_rules(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))  # fully transparent white
    (tmp_path / "c").mkdir()
    rgba.save(tmp_path / "c" / "t.png")
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buf, format="PNG")
    (tmp_path / "c" / "w16.png").write_bytes(buf.getvalue())
    images, _, _ = load_image_folder(tmp_path, default_preprocess(4, 4, "L"))
    assert images[0].max() == 0  # transparent -> alpha_background 0 (black), as the service does
    assert images[1].min() == 255  # 16-bit white scales to 255, not clipped garbage
