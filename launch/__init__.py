"""The composition root: the one place that composes the mesh's services into processes.

``launch.cli`` is the ``llorch`` command, ``launch.home`` the home profile (``llorch up``),
``launch.serve`` one service of a fleet (``llorch serve``), ``launch.gateway`` the REST edge's
process, and ``launch.harness`` the composition the home profile, the tests and the benchmarks
share. It may import every package; no package imports it (tests/test_layers.py).
"""
