"""The reporters' output, in-process: no database."""

from __future__ import annotations

import io

import pytest

from jobrunner.config import load
from jobrunner.report import PlainReporter, TerminalReporter

# What notices quote: errors and items, brackets included.
QUOTED = "item [/tmp/x] failed: [bold]not markup[/bold] (2013, '[Errno 104] Connection reset by peer')"


@pytest.mark.parametrize("kind", [TerminalReporter, PlainReporter])
def test_a_notice_prints_what_it_quotes_verbatim(kind, tmp_path):
    config = load({}, job="job", environ={}, cwd=tmp_path)
    stderr = io.StringIO()
    reporter = kind(config, stderr)
    reporter.notice(QUOTED)
    # rich wraps at the terminal's width (80 columns here): compare the words.
    assert " ".join(QUOTED.split()) in " ".join(stderr.getvalue().split())
