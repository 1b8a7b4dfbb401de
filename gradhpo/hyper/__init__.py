"""Hypergradient engine (pure functional core)."""
