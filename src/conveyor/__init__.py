"""Conveyor: a durable service for data-processing requests."""

__version__ = "0.1.0"
