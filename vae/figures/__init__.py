"""Figures and the report, drawn from the tables alone."""
