"""User-named output paths (#22 class 1): never replace a file the command did not write, check
the suffix, name the file actually written, and turn an unwritable path into one line (exit 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from detector.errors import UserError
from detector.output_path import output_file, output_folder
from faults import assert_one_line_bad_input, record_fault, run_cli, run_cli_in_process


def _photo(path: Path) -> bytes:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("name", ["photo.png", "photo.PNG", "notes.png"])
def test_output_file_refuses_an_existing_file_it_did_not_write(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"the user's bytes")
    with pytest.raises(UserError, match="already exists and was not written by this command"):
        output_file(path, "out", (".png",))
    assert path.read_bytes() == b"the user's bytes"


def test_output_file_replaces_only_what_owned_recognises(tmp_path):
    path = tmp_path / "d.png"
    path.write_bytes(b"ours")
    assert output_file(path, "out", (".png",), owned=lambda p: p.read_bytes() == b"ours") == path


@pytest.mark.parametrize("name", ["x.jpg", "x.gif", "x.svg", "x.png.bak", "x.txt"])
def test_output_file_refuses_another_suffix(tmp_path, name):
    with pytest.raises(UserError, match="cannot write a '.*' file; use .png"):
        output_file(tmp_path / name, "out", (".png",))


@pytest.mark.parametrize("name,written", [("diagram", "diagram.png"), ("a.b/c", "a.b/c.png")])
def test_output_file_without_suffix_gets_the_default_one(tmp_path, name, written):
    assert output_file(tmp_path / name, "out", (".png",)) == tmp_path / written


def test_output_file_refuses_folders_and_paths_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match="is a file, not a folder"):
        output_file(tmp_path / "file" / "x.png", "out", (".png",))
    with pytest.raises(UserError, match="is a folder"):
        output_file(tmp_path / "dir.png", "out", (".png",))
    with pytest.raises(UserError, match="names a folder"):
        output_file(f"{tmp_path}/", "out", (".png",))


def test_output_folder_refuses_files_it_would_replace(tmp_path):
    (tmp_path / "a.png").write_text("x")
    (tmp_path / "c.json").write_text("x")
    with pytest.raises(UserError, match="already holds a.png .and 1 more"):
        output_folder(tmp_path, "out", ["a.png", "b.png", "c.json"])
    with pytest.raises(UserError, match="already holds c.json; pass a new"):
        output_folder(tmp_path, "out", ["b.png", "c.json"])
    with pytest.raises(UserError, match="is a file, not a folder"):
        output_folder(tmp_path / "a.png", "out", ["x.json"])
    assert output_folder(tmp_path / "new" / "deeper", "out", ["a.png"]) == tmp_path / "new" / "deeper"


# ---------------------------------------------------------------------- python -m search show out=
@pytest.mark.parametrize("name", ["photo.png", "photo.jpg", "holiday.JPG"])
def test_show_never_replaces_a_users_image(tmp_path, name, record_property):
    """It replaced an existing photo with the diagram (exit 0)."""
    photo = tmp_path / name
    if name.endswith("png"):
        before = _photo(photo)
    else:
        before = b"\xff\xd8jpeg bytes"
        photo.write_bytes(before)
    outcome = run_cli_in_process("search", ["show", "arch=nasfcos", f"out={photo}"])
    assert_one_line_bad_input(outcome, name)
    assert photo.read_bytes() == before
    record_fault(record_property, 1, int(photo.read_bytes() != before))


@pytest.mark.parametrize("out", ["x.gif", "x.pdf", "file/x.png", "/proc/nasfcos-test/x.png"])
def test_show_bad_out_is_one_line_and_writes_nothing(tmp_path, out, record_property):
    (tmp_path / "file").write_text("not a folder")
    target = out if out.startswith("/") else str(tmp_path / out)
    assert_one_line_bad_input(run_cli_in_process("search", ["show", "arch=nasfcos", f"out={target}"]), out,
                              strict=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    record_fault(record_property, 1, None)


def test_show_without_suffix_prints_the_file_it_writes_and_redraws_its_own(tmp_path, record_property):
    """out=<name> printed one path and wrote <name>.png; now both are <name>.png, and a second
    show may replace the diagram the first one wrote (its PNG carries the mark)."""
    done = run_cli("search", "show", "arch=nasfcos", f"out={tmp_path / 'diagram'}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"diagram: {tmp_path / 'diagram.png'}" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["diagram.png"]
    again = run_cli_in_process("search", ["show", "arch=fcos", f"out={tmp_path / 'diagram.png'}"])
    assert again.code == 0, again.stderr
    record_fault(record_property, 1, None)



@pytest.mark.parametrize("out", ["/proc/nasfcos-synth-test", "file/below"])
def test_synth_into_an_unwritable_path_is_one_line(tmp_path, out):
    (tmp_path / "file").write_text("not a folder")
    target = out if out.startswith("/") else str(tmp_path / out)
    outcome = run_cli_in_process("detector", ["synth", f"out={target}", "data.num_train=2", "data.num_val=1"])
    assert_one_line_bad_input(outcome, out, strict=False)
    assert (tmp_path / "file").read_text() == "not a folder"
