"""Job discovery and loading (no database)."""

import pytest

from jobrunner import jobs
from jobrunner.exceptions import JobError


def test_discover_lists_jobs_with_their_summary(jobs_dir, write_job):
    write_job("alpha", '"""First line.\n\nMore."""\ndef items(c, s): return []\ndef process(c, s, i): pass\n')
    write_job("_helper", "X = 1\n")
    write_job("beta", "def items(c, s): return []\ndef process(c, s, i): pass\n")
    found = jobs.discover(jobs_dir)
    assert [(j.name, j.summary) for j in found] == [("alpha", "First line."), ("beta", "")]


def test_discover_does_not_run_job_code(jobs_dir, write_job, tmp_path):
    marker = tmp_path / "ran"
    write_job("sneaky", f'"""Doc."""\nopen({str(marker)!r}, "w").write("x")\n')
    jobs.discover(jobs_dir)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["-x", "a b", "a/b", "../etc", "", "é"])
def test_bad_names_are_refused(jobs_dir, name):
    with pytest.raises(JobError, match="invalid job name"):
        jobs.load(jobs_dir, name)


def test_unknown_job_lists_known_ones(jobs_dir, write_job):
    write_job("real", "def items(c, s): return []\ndef process(c, s, i): pass\n")
    with pytest.raises(JobError, match=r"unknown job 'nope'.*known jobs: real"):
        jobs.load(jobs_dir, "nope")


def test_syntax_error_names_file_and_line(jobs_dir, write_job):
    path = write_job("broken", "def items(c, s):\n    return [\n\ndef process(:\n")
    with pytest.raises(JobError) as info:
        jobs.load(jobs_dir, "broken")
    assert str(path) in str(info.value) and "SyntaxError" in str(info.value)


def test_import_error_names_file_and_line(jobs_dir, write_job):
    path = write_job("raises", "x = 1\nraise RuntimeError('at import')\n")
    with pytest.raises(JobError) as info:
        jobs.load(jobs_dir, "raises")
    assert f"{path}:2: RuntimeError: at import" in str(info.value)


def test_missing_functions_are_named(jobs_dir, write_job):
    write_job("half", "def items(c, s): return []\nprocess = 3\n")
    with pytest.raises(JobError, match=r"does not define process\(\)"):
        jobs.load(jobs_dir, "half")


def test_hooks_are_optional_and_loaded(jobs_dir, write_job):
    write_job(
        "full",
        "def items(c, s): return []\ndef process(c, s, i): pass\n"
        "def setup(c, s): pass\ndef item_key(i): return str(i)\n",
    )
    job = jobs.load(jobs_dir, "full")
    assert job.setup is not None and job.item_key is not None and job.count is None
