"""Evaluation job configs, one file per dataset and protocol (`<dataset>_<protocol>.py`), built on `base.py`."""
