"""llmslo load test: ``locust -f loadtest/`` (the locustfile is loadtest/locustfile.py).

Modules whose names start with ``_`` are helpers that Locust does not load as
locustfiles. Programs run a bounded headless test with :func:`run_headless`.
"""

from loadtest._headless import Outcome, run_headless

__all__ = ["Outcome", "run_headless"]
