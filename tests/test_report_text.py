"""Reports that a benchmark script rewrites keep the reading written by hand below their marker."""

from evox_merge.util.report_text import hand_written, keep_marker, replace_section, with_hand_written


def test_rewrite_keeps_the_hand_written_part(tmp_path):
    path = tmp_path / "report.md"
    assert hand_written(path, "bench.py") == ""
    path.write_text(with_hand_written("# Table v1", path, "bench.py"))
    path.write_text(path.read_text() + "My reading.\n")
    path.write_text(with_hand_written("# Table v2", path, "bench.py"))
    text = path.read_text()
    assert text.startswith("# Table v2") and "v1" not in text
    assert text.endswith(keep_marker("bench.py") + "\nMy reading.\n")
    assert hand_written(path, "other.py") == ""  # another script's marker is not this one's


def test_a_section_is_replaced_and_everything_else_kept(tmp_path):
    path = tmp_path / "report.md"
    path.write_text(replace_section(path, "a", "table A1", "# Title\n"))
    path.write_text(path.read_text() + "\nMy reading.\n")
    path.write_text(replace_section(path, "b", "table B1"))
    path.write_text(replace_section(path, "a", "table A2"))
    text = path.read_text()
    assert text.startswith("# Title\n") and "A1" not in text and "My reading." in text
    assert text.index("table A2") < text.index("My reading.") < text.index("table B1")
