"""Reproduce every table: stages (one launcher each) and the RESULTS.md / results.json they feed."""
