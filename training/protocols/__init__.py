"""Evaluation protocols: class splits and averaging rules (`splits`), recipes, runner, reports."""
