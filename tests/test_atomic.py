"""Files written through construct.atomic are whole or absent, never half written."""

import pytest

from construct.atomic import atomic_path, write_text_atomic


def test_a_failing_writer_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("previous", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new", encoding="utf-8")
            raise RuntimeError("disk full")
    assert target.read_text(encoding="utf-8") == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_finished_writer_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "run" / "nested" / "config.yaml"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second ü")
    assert target.read_text(encoding="utf-8") == "second ü"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.yaml"]


def test_a_stray_temporary_from_a_killed_writer_is_replaced(tmp_path):
    target = tmp_path / "latest.pth"
    (tmp_path / "latest.pth.tmp").write_bytes(b"half a checkpoint")
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert not (tmp_path / "latest.pth.tmp").exists()
