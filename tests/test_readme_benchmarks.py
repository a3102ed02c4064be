"""The README's benchmark table is the one the committed results make."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import readme_table


def test_the_readme_table_is_made_from_the_committed_results() -> None:
    assert readme_table.main(["--check"]) == 0, "stale: run python -m bench.readme_table"


def test_a_changed_result_makes_the_check_fail_and_the_write_fix_it(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold table\n{readme_table.END}\noutro\n")
    assert readme_table.main(["--check", "--readme", str(readme)]) == 1
    assert readme_table.main(["--readme", str(readme)]) == 0
    assert readme_table.main(["--check", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("\noutro\n")
    assert "old table" not in text


def test_every_figure_comes_from_a_result_file(tmp_path: Path) -> None:
    """A result file changed on disk changes the table: nothing in it is typed in by hand."""
    results = tmp_path / "results"
    results.mkdir()
    for source in readme_table.RESULTS.glob("*.json"):
        (results / source.name).write_text(source.read_text())
    before = readme_table.render(results=results)
    swap = results / "swap.json"
    swap.write_text(swap.read_text().replace('"failed_requests": 0', '"failed_requests": 7'))
    after = readme_table.render(results=results)
    assert "0 failed requests" in before
    assert "7 failed requests" in after


def test_a_readme_without_the_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="bench-table"):
        readme_table.replaced("no table here", "x")
