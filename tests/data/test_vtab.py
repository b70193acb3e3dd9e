"""Each bad-data case stops with one error naming the task, file and line."""

import pytest

from gist_exp.data.tasks import TASKS
from gist_exp.data.vtab import load_protocol, read_split_list
from gist_exp.errors import DataError

DTD = TASKS["dtd"]


def rewrite(path, transform):
    path.write_text(transform(path.read_text()))


def test_valid_tree_loads(small_root):
    train, test = load_protocol(small_root, DTD, "final")
    assert (len(train), len(test)) == (40, 20) and train.split == "train800val200" and test.split == "test"
    train, val = load_protocol(small_root, DTD, "tune")
    assert (train.split, val.split, len(train), len(val)) == ("train800", "val200", 32, 8)


def test_crlf_and_extra_whitespace_are_tolerated(small_root):
    rewrite(small_root / "dtd/test.txt", lambda s: "\r\n".join(f"  {line}   " for line in s.splitlines()) + "\r\n\r\n")
    _, test = load_protocol(small_root, DTD, "final")
    assert len(test) == 20 and test.paths[0].name == "000000.jpg"


def test_missing_task_directory_suggests_the_renamed_one(small_root):
    (small_root / "dtd").rename(small_root / "dtd_v2")
    with pytest.raises(DataError) as error:
        load_protocol(small_root, DTD, "final")
    message = str(error.value)
    assert f"task directory '{small_root / 'dtd'}'" in message and "Found 'dtd_v2'" in message and "mv " in message


def test_alias_named_directory_is_pointed_out(tmp_path):
    from gist_exp.data import fake
    fake.make_task(tmp_path, "eurosat", 10, 5)
    (tmp_path / "eurosat").rename(tmp_path / "pets")
    with pytest.raises(DataError, match="Found 'pets' instead; if it holds oxford_iiit_pet"):
        load_protocol(tmp_path, TASKS["oxford_iiit_pet"], "final")


def test_missing_root_and_split_list(small_root):
    with pytest.raises(DataError, match="is not a directory.*NOAH layout"):
        load_protocol(small_root / "absent", DTD, "final")
    (small_root / "dtd/test.txt").unlink()
    with pytest.raises(DataError, match=r"split list '.*dtd/test.txt' is missing for task dtd"):
        load_protocol(small_root, DTD, "final")


@pytest.mark.parametrize("bad_line, expected", [
    ("images/test/000003.jpg", "line 4: expected '<relative path> <label>'"),
    ("images/test/000003.jpg 3 extra", "line 4: expected '<relative path> <label>'"),
    ("images/test/000003.jpg three", "line 4: label 'three' is not an integer"),
    ("images/test/000003.jpg 2.0", "line 4: label '2.0' is not an integer"),
    ("images/test/000003.jpg 47", "line 4: label 47 is outside [0, 47) for dtd"),
    ("images/test/000003.jpg -1", "line 4: label -1 is outside [0, 47)"),
    ("../../etc/passwd 1", "line 4: image path '../../etc/passwd' escapes the task directory"),
    ("/etc/passwd 1", "line 4: image path '/etc/passwd' escapes the task directory"),
])
def test_bad_lines_are_named_with_file_and_line(small_root, bad_line, expected):
    def replace_fourth(text):
        lines = text.splitlines()
        lines[3] = bad_line
        return "\n".join(lines) + "\n"
    rewrite(small_root / "dtd/test.txt", replace_fourth)
    with pytest.raises(DataError) as error:
        load_protocol(small_root, DTD, "final")
    assert f"{small_root / 'dtd/test.txt'} {expected}" in str(error.value)


def test_many_bad_lines_are_listed_up_to_a_limit_or_all(small_root):
    rewrite(small_root / "dtd/test.txt", lambda s: "".join(f"{line.split()[0]} 99\n" for line in s.splitlines()))
    with pytest.raises(DataError) as error:
        read_split_list(small_root / "dtd", DTD, "test")
    assert "20 bad line(s)" in str(error.value) and "... and 10 more (data.list_all_errors=true" in str(error.value)
    with pytest.raises(DataError) as error:
        read_split_list(small_root / "dtd", DTD, "test", list_all=True)
    assert str(error.value).count("is outside [0, 47)") == 20


def test_missing_and_empty_images_are_named(small_root):
    (small_root / "dtd/images/test/000002.jpg").unlink()
    (small_root / "dtd/images/test/000005.jpg").write_bytes(b"")
    with pytest.raises(DataError) as error:
        load_protocol(small_root, DTD, "final")
    message = str(error.value)
    assert "2 bad image file(s) in dtd/test" in message
    assert f"{small_root / 'dtd/images/test/000002.jpg'}: missing (listed in {small_root / 'dtd/test.txt'} line 3)" in message
    assert "000005.jpg: empty file" in message


def test_symlinked_images_folder_is_allowed(small_root, tmp_path):
    images = small_root / "dtd/images"
    images.rename(tmp_path / "elsewhere")
    images.symlink_to(tmp_path / "elsewhere")
    train, _ = load_protocol(small_root, DTD, "final")
    assert train.paths[0].is_file()
