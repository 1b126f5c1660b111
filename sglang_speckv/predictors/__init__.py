"""Predictors: per-scalar (mu, sigma) estimates of a KV page. See base.py for the contract."""
