"""Export: checkpoint -> bundle (ONNX query/item encoders with the train-only heads stripped, FAISS index, manifest).

    export.bundle_writer.export_checkpoint(checkpoint, out_dir, index=..., exporter=...)  the whole export
    export.onnx_export.build_served_towers / export_encoders / graph_structure           served graphs
    export.parity.check_parity(bundle_dir, setup_or_checkpoint)                           PyTorch vs ORT
    export.index.build_index(embeddings, "flat" | "hnsw" | "ivfpq", params)               FAISS
    export.optimize.make_variant(onnx_in, onnx_out, variant_of(optimize, "int8"))          ORT-optimised / int8 encoders

The bundle schema and its validating loader live in `karma.bundle` (torch-free, shared with the service).
Importing this package imports nothing heavy; the submodules import torch.
"""
