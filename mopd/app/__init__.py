"""The app: what turns a recipe into a run, and the only layer that imports the workers.

- ``mopd.app.cli``         the ``mopd`` command (validate, train, export, quickstart)
- ``mopd.app.run``         ``run_training``: pre-start checks, the pools, the loop, shutdown
- ``mopd.app.quickstart``  ``mopd quickstart``: SFT student, derived teachers, MOPD, report
- ``mopd.app.report``      the quickstart's report and the seed table

Layers (docs/architecture.md): the core (``mopd/``) imports neither workers nor the app; the
workers (``teachers/``, ``rollout/``, ``trainers/``) import only the core; the app imports both.
"""
