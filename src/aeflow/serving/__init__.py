"""Running trained models on real scans.

- `aeflow.serving.predict.predict_paths`: files, folders, DICOM series, NIfTI volumes -> CSV + heat-map overlays.
- `aeflow.serving.export.export_onnx` / `OnnxScorer`: a checked ONNX graph with pre-processing and calibration.
- `aeflow.serving.server.create_app` / `serve`: HTTP API and web page (FastAPI, uvicorn).
- `aeflow.serving.commands.register`: the `predict`, `export` and `serve` verbs of the command line.
- `aeflow.serving.runtime.LoadedRun`: a run folder loaded once (model, pre-processing, threshold), shared by all.

Submodules are imported where used, so `import aeflow.serving` needs neither FastAPI nor onnxruntime.
"""
