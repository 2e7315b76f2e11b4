"""Discrete-event simulator of the mesh (see bench/sim/sim.py)."""
