"""Presets (config/train_*.py, applied by path as a run's first arguments) and train.py's keys
(config/defaults.py)."""
