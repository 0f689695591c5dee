"""The study: search space, one trial, the Tune/Train scaffolding, Pareto, seed repeats, reports."""
