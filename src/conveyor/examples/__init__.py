"""Worked examples that run on Conveyor out of the box (the built-in pipelines)."""
