"""Heads and scratch baselines, one training loop, run reports."""
