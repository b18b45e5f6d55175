"""Export: strips the train-only heads and writes the ONNX bundle (issue: export)."""
