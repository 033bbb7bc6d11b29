"""msdiffusion.atomic: a destination holds its old content or all of the new one, never a part."""

from __future__ import annotations

import pytest

from msdiffusion.atomic import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".jsonl" and tmp.name.startswith(".")
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]


def test_a_folder_is_replaced_whole_and_stale_temporaries_go(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    stale = tmp_path / ".adapter.tmp-999999"  # left by a killed writer
    stale.mkdir()
    (stale / "half").write_text("x")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert not (folder / "new.txt").exists()  # invisible until complete
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_text_atomic(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "report.md", "# report\n")
    assert path.read_text() == "# report\n"
    write_text_atomic(path, "# again\n")
    assert path.read_text() == "# again\n"
