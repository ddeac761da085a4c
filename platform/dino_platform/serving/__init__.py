"""Running a model: drawn predictions (``predict``), batch inference on Ray Data (``infer``), ONNX export (``onnx``)."""
