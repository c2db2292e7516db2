"""One module per figure of issue 7; each exposes `async def run(cfg, result)` filling in a
ScenarioResult (bench/__main__.py lists them in SCENARIOS)."""
