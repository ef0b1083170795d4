"""Simulators and local services that stand in for the outside systems."""
