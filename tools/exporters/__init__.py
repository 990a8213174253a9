"""Vision tower exporters (offline tools): mmproj GGUF or Hugging Face checkpoint → ONNX tower."""
