"""Calibration: activation statistics of a converted model (whole model or layer by layer), the per-linear
precision choice of ``scheme.auto``, and the calibration report."""
