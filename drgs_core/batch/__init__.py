"""`drgs4d batch`: many reconstructions (a folder of cases or a manifest) as Ray tasks; see jobs.py and runner.py.

Ray is imported only when a batch runs, so the engine works without it (``pip install drgs4d[batch]``).
"""

from .jobs import Job, read_jobs, register_input_kind, write_results  # noqa: F401


def run_batch(*args, **kwargs):
    """See :func:`drgs_core.batch.runner.run_batch` (imported lazily)."""
    from .runner import run_batch as _run

    return _run(*args, **kwargs)
