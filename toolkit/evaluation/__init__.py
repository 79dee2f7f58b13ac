"""Metrics, evaluation of predictions and comparison of models."""
