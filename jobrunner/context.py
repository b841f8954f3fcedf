"""What a job's functions receive as ``ctx``."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class JobContext:
    """Read-only, so one instance is safely shared by every worker thread.

    - ``job``: the job's name
    - ``dry_run``: True under ``--dry-run``; skip outside effects (mail, HTTP)
    - ``params``: the ``--param KEY=VALUE`` pairs, values as strings
    - ``log``: the job's logger
    - ``stopping``: set once the run stops feeding items (a signal, the
      failure limit, a lost lock); a long ``process`` may check it
    """

    job: str
    dry_run: bool = False
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("jobrunner.job"))
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    run_id: int | None = None
