import pytest
from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation.images import list_image_files, load_image


def test_list_image_files_sorts_by_name_and_skips_other_files(tmp_path):
    for name in ["2_0.png", "10_0.jpg", "1_0.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "prompts.csv").write_text("prompt\n")
    (tmp_path / "sub").mkdir()

    assert [path.name for path in list_image_files(tmp_path)] == ["10_0.jpg", "1_0.png", "2_0.png"]


def test_list_image_files_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(SafeTextError, match="does not exist"):
        list_image_files(tmp_path / "nowhere")
    with pytest.raises(SafeTextError, match="holds no"):
        list_image_files(tmp_path)


def test_load_image_converts_to_rgb_and_reports_unreadable_files(tmp_path):
    Image.new("L", (5, 3), color=7).save(tmp_path / "gray.png")
    image = load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (7, 7, 7)

    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SafeTextError, match="cannot read image"):
        load_image(tmp_path / "broken.png")
