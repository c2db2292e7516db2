"""One module per figure of BENCHMARKS.md; each exposes `async def run(cfg, result)` filling in a
ScenarioResult (bench/__main__.py lists them in SCENARIOS)."""
