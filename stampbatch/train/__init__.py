"""Training one architecture on labelled stores: the data stream and its normalisation,
the models, the epoch loop, the run directory, and what a finished run leaves
(calibration, metrics, the ONNX export)."""
