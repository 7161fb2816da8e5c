"""``fastaccum bench``: fastaccum against native PyTorch on a real training workload.

- :mod:`~fastaccum.bench.data`: real text (the standard library's sources) as bytes, and
  deterministic windows of micro-batches;
- :mod:`~fastaccum.bench.runs`: the native and fastaccum training runs and the loop that
  times them;
- :mod:`~fastaccum.bench.training`: one bench invocation, end to end;
- :mod:`~fastaccum.bench.report`: table, ``bench.json`` and plot;
- :mod:`~fastaccum.bench.ops`: the op micro-benchmark behind ``fastaccum bench-ops``;
- :mod:`~fastaccum.bench.timing`: timing helpers shared with ``benchmarks/``.
"""
