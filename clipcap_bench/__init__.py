"""Benchmark harness: per-stage latency of every backend side by side, serving load, roofline, history.

One job per module: `backends` (what each name runs, timed), `latency` (the interleaved run),
`statistics`, `roofline`, `machine`, `schema` (report JSON), `bundles` (bundle kinds, the
full-size model), `report` (Markdown and plots), `load` (HTTP load generator), `torchserve` (a
private local server for the quick profile), `history` (records), `regression` (the check),
`trends` (the plots over commits), `profiles` (the quick profile). The scripts in benchmarks/ only
parse arguments and call these.
"""
