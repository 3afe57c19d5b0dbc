"""What goes in and out: checkpoints and their families, calibration and evaluation text, loading a converted
model, and the export."""
