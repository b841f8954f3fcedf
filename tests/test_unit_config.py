"""Configuration: precedence, validation, paths, secrets (no database)."""

from pathlib import Path

import pytest

from jobrunner.config import load, redact_url
from jobrunner.exceptions import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_resolve_against_the_current_folder(tmp_path):
    config = load({}, job="update", environ={}, cwd=tmp_path)
    assert config.workers == 4
    assert config.jobs_path == tmp_path / "jobs"
    assert config.database_url == f"sqlite:///{tmp_path / 'jobrunner.db'}"


def test_precedence_flag_over_env_over_job_section_over_file(tmp_path):
    cfg = write(tmp_path / "c.toml", "workers = 2\n[jobs.update]\nworkers = 3\n")
    assert load({"config": str(cfg)}, job="other", environ={}, cwd=tmp_path).workers == 2
    assert load({"config": str(cfg)}, job="update", environ={}, cwd=tmp_path).workers == 3
    env = {"JOBRUNNER_WORKERS": "5"}
    assert load({"config": str(cfg)}, job="update", environ=env, cwd=tmp_path).workers == 5
    assert load({"config": str(cfg), "workers": 6}, job="update", environ=env, cwd=tmp_path).workers == 6


def test_an_async_runs_default_concurrency_never_holds_fewer_items_than_its_workers_chunks(tmp_path):
    def in_flight(flags, module=None):
        config = load(flags, job="update", environ={}, cwd=tmp_path)
        return config.with_job_defaults(module or {}, "jobs/update.py").items_in_flight

    assert in_flight({}) == 100
    assert in_flight({"workers": 8, "batch_size": 10}) == 100
    assert in_flight({"workers": 4, "batch_size": 1000}) == 4000  # four chunks, one per worker
    assert in_flight({"workers": 4}, {"batch_size": 50}) == 200  # BATCH_SIZE = 50 in the module
    # Set, it is what was asked for, even below one chunk per worker.
    assert in_flight({"workers": 4, "batch_size": 1000, "concurrency": 100}) == 100
    assert in_flight({"workers": 4, "batch_size": 1000}, {"concurrency": 50}) == 50
    cfg = write(tmp_path / "c.toml", "[jobs.update]\nconcurrency = 300\n")
    assert in_flight({"config": str(cfg), "batch_size": 1000}) == 300


def test_config_from_environment_and_default_file(tmp_path):
    write(tmp_path / "jobrunner.toml", "workers = 7\n")
    assert load({}, environ={}, cwd=tmp_path).workers == 7
    other = write(tmp_path / "other.toml", "workers = 9\n")
    assert load({}, environ={"JOBRUNNER_CONFIG": str(other)}, cwd=tmp_path).workers == 9


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    cfg = write(folder / "c.toml", 'jobs_path = "myjobs"\ndatabase_url = "sqlite:///data/x.db"\n')
    config = load({"config": str(cfg)}, environ={}, cwd=tmp_path / "elsewhere")
    assert config.jobs_path == folder / "myjobs"
    assert config.database_url == f"sqlite:///{folder / 'data/x.db'}"
    # the defaults too, when a config file is in use
    bare = write(folder / "bare.toml", "workers = 1\n")
    config = load({"config": str(bare)}, environ={}, cwd=tmp_path)
    assert config.jobs_path == folder / "jobs"
    assert config.database_url == f"sqlite:///{folder / 'jobrunner.db'}"


def test_flags_resolve_against_the_current_folder(tmp_path):
    cfg = write(tmp_path / "c.toml", "workers = 1\n")
    config = load({"config": str(cfg), "jobs_path": "j"}, environ={}, cwd=tmp_path / "cwd")
    assert config.jobs_path == tmp_path / "cwd" / "j"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("wokers = 3\n", "'wokers' is unknown"),
        ("[jobs.update]\nschedul = 'x'\n", "[jobs.update] key 'schedul' is unknown"),
        ("schedule = '* * * * *'\n", "'schedule' is unknown"),  # only per job
        ("workers = 0\n", "must be at least 1"),
        ("workers = 'four'\n", "expected a whole number"),
        ("no_lock = 'maybe'\n", "expected true or false"),
        ("lock = 'mutex'\n", "expected one of row, advisory"),
        ("workers = [\n", "not valid TOML"),
        ("jobs = 3\n", "must be a table"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, fragment):
    cfg = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load({"config": str(cfg)}, job="update", environ={}, cwd=tmp_path)
    assert fragment in str(info.value)
    assert str(cfg) in str(info.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load({"config": str(tmp_path / "nope.toml")}, environ={}, cwd=tmp_path)


def test_bad_environment_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="JOBRUNNER_WORKERS"):
        load({}, environ={"JOBRUNNER_WORKERS": "many"}, cwd=tmp_path)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///:memory:", "sqlite://", "sqlite:///file:x?mode=memory&uri=true", "sqlite:///"],
)
def test_in_memory_sqlite_is_refused(tmp_path, url):
    with pytest.raises(ConfigError, match="in-memory"):
        load({"database_url": url}, environ={}, cwd=tmp_path)


@pytest.mark.parametrize("url", ["mssql://u@h/db", "oracle://x", "not a url", "postgres://u@h/db"])
def test_unsupported_urls_are_refused(tmp_path, url):
    with pytest.raises(ConfigError):
        load({"database_url": url}, environ={}, cwd=tmp_path)


def test_bare_postgresql_url_means_psycopg2(tmp_path):
    config = load({"database_url": "postgresql://u@h/db"}, environ={}, cwd=tmp_path)
    assert config.database_url == "postgresql+psycopg2://u@h/db"


def test_passwords_are_redacted():
    url = "postgresql+psycopg2://app:s3cr@t/x@db:5432/app?password=other&x=1"
    assert "s3cr" not in redact_url(url)
    assert "other" not in redact_url(url)
    assert redact_url("postgresql://app:pw@db/app") == "postgresql://app:***@db/app"


def test_password_is_not_in_config_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load({"database_url": "oracle://app:hunter2@db/app"}, environ={}, cwd=tmp_path)
    assert "hunter2" not in str(info.value)


def test_config_example_is_valid_and_documents_every_key(tmp_path):
    from jobrunner.config import SETTINGS

    example = Path(__file__).parent.parent / "config.example.toml"
    text = example.read_text()
    config = load({"config": str(example)}, job="update", environ={}, cwd=tmp_path)
    assert config.job_sections["update"]["schedule"]
    for key in SETTINGS:
        assert f"{key} =" in text or f"# {key} =" in text, key
