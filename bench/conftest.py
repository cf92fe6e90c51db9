"""pytest-benchmark helpers: after the run, print each method's time as a ratio to the
baseline of its group (the benchmark whose name contains "baseline")."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    terminalreporter.write_sep("-", "ratios to the baseline of each group (median time; < 1 is faster)")
    for group, benches in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = next((b for b in benches if "baseline" in b.name), None)
        if base is None:
            continue
        base_median = base.stats.median
        for b in benches:
            terminalreporter.write_line(
                f"{group}: {b.name:60s} {b.stats.median * 1e3:10.1f} ms   ratio {b.stats.median / base_median:5.2f}")
