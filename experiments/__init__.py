"""Experiment drivers: many ``train.py fit`` runs of the example model, then one report.

- ``experiments.compare``: ``train.py compare``, every config x seed, ``report.md`` + ``.png``.
- ``experiments.frontier``: ``train.py frontier``, validation loss against active-expert compute.
- ``experiments/tune_sweep.py``: a hyper-parameter sweep on a held-out seed (a script).

Each run is a child ``train.py fit`` process of the checkout; the drivers import ``models`` (the
model, its Lightning module and CLI), never the other way round. ``results/`` holds the tuning
records that the shipped configs cite.
"""
