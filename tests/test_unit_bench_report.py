"""bench/run.py writes BENCHMARKS.md from its table of sections: a section
measured now is rendered, every other keeps its text. No database."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_run"]


STARTUP = {
    "measured": "2030-01-02",
    "command": "python bench/run.py --only startup --runs 7",
    "quick": False,
    "data": [
        {"command": "jobrunner --help", "median_ms": 111.0},
        {"command": "jobrunner list", "median_ms": 222.0},
    ],
}


def numbered(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)]


def test_the_table_holds_every_numbered_part_of_benchmarks_md_in_its_order(bench):
    committed = numbered((REPO / "BENCHMARKS.md").read_text())
    table = [n for section in bench.SECTIONS for n in section.numbers]
    assert committed == table
    for section in bench.SECTIONS:
        assert (section.measure is None) == (section.render is None) == bool(section.scripts)
        for script in section.scripts:
            assert (REPO / script).exists(), script


def test_one_section_measured_is_rewritten_and_every_other_part_is_kept_as_it_was(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text((REPO / "BENCHMARKS.md").read_text())
    before = bench.file_parts(path)

    bench.write_report({"startup": STARTUP}, path, {"startup"})

    after = bench.file_parts(path)
    assert sorted(after) == sorted(before)
    assert {n for n in before if before[n] != after[n]} == {6}
    assert "| jobrunner list | 222 |" in after[6]
    assert "Measured on 2030-01-02 by `python bench/run.py --only startup --runs 7`." in after[6]
    assert path.read_text().rstrip().endswith(bench.LIMITS.format(cores=bench.os.cpu_count()).rstrip())


def test_saved_results_of_a_section_not_named_are_not_written_over_its_text(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text((REPO / "BENCHMARKS.md").read_text())
    before = bench.file_parts(path)
    bench.write_report({"startup": STARTUP}, path, {"batches"})
    assert bench.file_parts(path) == before


def test_a_fresh_clone_with_one_section_measured_gets_a_report_saying_how_to_measure_the_rest(
    bench, tmp_path
):
    path = tmp_path / "BENCHMARKS.md"
    bench.write_report({"startup": STARTUP}, path, {"startup"})
    parts = bench.file_parts(path)
    assert sorted(parts) == sorted(n for section in bench.SECTIONS for n in section.numbers)
    assert "| jobrunner --help | 111 |" in parts[6]
    assert "Not measured yet: `python bench/run.py --only batches`." in parts[7]
    assert "Not measured yet: `python bench/hot_rows.py`" in parts[17]


def test_results_saved_in_an_older_format_are_not_read(bench, tmp_path):
    latest = tmp_path / "latest.json"
    latest.write_text('{"results": {"startup": [{"command": "x", "median_ms": 1}]}, "runs": 3}')
    assert bench.load_results(latest) == {}
    latest.write_text(json.dumps({"format": bench.RESULTS_FORMAT, "results": {"startup": {"data": []}}}))
    assert bench.load_results(latest) == {"startup": {"data": []}}
