"""Reward models: training (`rlhfkit reward`), scoring at the last real token, normalisation, ensembles."""
