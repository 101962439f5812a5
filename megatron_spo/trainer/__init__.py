"""Pieces the train loop calls: metrics logging, preemption handling, evaluation metrics, offline values."""
