"""clipcap_bench: the benchmark harness, beside the `clipcap` library and using only its public API.

One experiment skeleton (`experiment`: arms x inputs -> interleaved rounds -> samples), one report
envelope and registry of report kinds (`schema`), goals as data (`targets.toml`), one HTTP client
(`client`), one capacity rule (`capacity`), one server launcher (`torchserve`), the paired
regression check (`ab`, `paired`, `noise`). The scripts in benchmarks/ only parse arguments and
call these; benchmarks/README.md lists every module.
"""
