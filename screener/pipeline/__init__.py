"""The parallel, pipelined data path shared by the node and replay.

- ``pool``: isolated, resource-limited worker processes (``WorkerPool``).
- ``prepare``: what a worker does with one file (read, route, decode, window,
  preprocess to small uint8 model inputs) as a pure function of a ``Plan``.
- ``outcome``: the per-image result types (``ImageOutcome``, ``EngineResult``).

``screener.screening.Screener`` streams files through the pool into the engines.
"""
