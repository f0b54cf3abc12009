"""Reading images: every mode, EXIF orientation, and each kind of bad file."""

import numpy as np
import pytest
from images_for_tests import write_test_images
from PIL import Image

from rpn_cli.errors import ImageError
from rpn_cli.io.images import load_image
from rpn_cli.io.inputs import expand_inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_test_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("kind", ["jpeg", "png", "bmp", "tiff", "webp", "grey", "palette", "rgba", "16bit", "exif"])
def test_good_images_become_upright_rgb(files, kind):
    image = load_image(files[kind])
    assert image.mode == "RGB"
    assert image.size == (451, 300)  # the EXIF-rotated file is stored 300 x 451


def test_exif_rotation_restores_the_pixels(files):
    upright = np.asarray(load_image(files["exif"]), np.float32)
    reference = np.asarray(load_image(files["jpeg"]), np.float32)
    assert np.abs(upright - reference).mean() < 3.0


def test_sixteen_bit_is_rescaled_not_clipped(files):
    grey = np.asarray(load_image(files["16bit"]))[:, :, 0].astype(np.int32)
    reference = np.asarray(Image.open(files["grey"]).convert("L"), np.int32)
    assert np.abs(grey - reference).max() <= 1


def test_rgba_is_composited_over_white(files):
    pixels = np.asarray(load_image(files["rgba"]), np.float32)
    plain = np.asarray(load_image(files["png"]), np.float32)
    np.testing.assert_allclose(pixels, (plain * 128 + 255 * 127) / 255, atol=2)


@pytest.mark.parametrize("kind,words", [
    ("empty", "empty file"), ("text", "not an image"), ("truncated", "cannot decode"),
    ("corrupt", "cannot decode"), ("huge", "decompression bomb"),
])
def test_bad_files_raise_one_line_naming_the_file(files, kind, words):
    with pytest.raises(ImageError) as caught:
        load_image(files[kind])
    message = str(caught.value)
    assert str(files[kind]) in message and words in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.jpg")


def test_expand_inputs_files_folders_globs_and_stdin(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    for name in ("a/2.jpg", "a/1.png", "a/readme.txt", "a/sub/3.jpg"):
        (tmp_path / name).write_bytes(b"x")
    flat = expand_inputs([str(tmp_path / "a")])
    assert [item.relative for item in flat] == ["1.png", "2.jpg"]
    deep = expand_inputs([str(tmp_path / "a")], recursive=True)
    assert [item.relative for item in deep] == ["1.png", "2.jpg", "sub/3.jpg"]
    globbed = expand_inputs([str(tmp_path / "a" / "*.jpg"), str(tmp_path / "none*.jpg"), str(tmp_path / "gone.jpg")])
    assert globbed[0].given == str(tmp_path / "a" / "2.jpg") and globbed[0].problem is None
    assert globbed[1].problem == "no image matches this pattern"
    assert globbed[2].problem == "no such file or folder"
    assert expand_inputs([""])[0].problem == "an empty path (an unset shell variable?)"  # not the current folder
    import io

    listed = expand_inputs(["-"], stdin=io.StringIO(f"{tmp_path}/a/2.jpg\n\n{tmp_path}/a/sub/3.jpg\n"))
    assert [item.given for item in listed] == [f"{tmp_path}/a/2.jpg", f"{tmp_path}/a/sub/3.jpg"]
