"""Request policies (cache, budgets, rate limits, experiments, templates): run in a fixed order."""
