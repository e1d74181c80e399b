"""What the model server, the load test and the generators agree on.

The bottom of the import graph: nothing here imports ``serve``, ``loadtest``
or ``llmslo`` (nor Ray), so each of them can depend on it and none depends on
another. ``slo`` is the SLO model read from slo.yaml, ``names`` every exported
Prometheus metric name, ``record`` the one typed per-request record that the
load test's stream reader fills and its verdict and report read.
"""
