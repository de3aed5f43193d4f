"""Tests of calibration: the value, the recorder, guidance calibration."""
