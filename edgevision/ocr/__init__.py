"""Reading text in the camera frame (OCR): detection → orientation → recognition, in reading order.

`reader.TextReader` is the pipeline, written with numpy and OpenCV basics only (what the board's OpenCV
has); the three networks (PP-OCRv5 text detection, text-line orientation, text recognition) run on a
back-end chosen by `ocr.backend`, like the vision tower's: ONNX Runtime here, TensorRT on the board.
"""
