"""Benchmarks run together and kept: ``edgevision bench board HOST`` (over SSH), ``edgevision bench suites``
(on this machine) and ``edgevision report RESULTS``.

- `results`: the results folder's JSON (schema, figures with units, median and spread, comparability);
- `machine`: what the machine is and what else was running (board, JetPack, power mode, load);
- `sampler`: power and memory sampled through every suite;
- `suites`: the benchmark suites, one registry entry each; `runner`: runs them into a results folder;
- `remote`: the SSH side (sync, environment, run, fetch); `plots` and `report`: the HTML and Markdown page.
"""
