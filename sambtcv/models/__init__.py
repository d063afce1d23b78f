"""The models and how they run: `backbones` (the SAM-family registry; `InputFrame` owns input geometry),
`decoder` (the batched prompt decoder), `embeddings` (the embedding cache), `runtime` / `openvino_runtime`
(PyTorch or OpenVINO), `precision` (fp32 / bf16 and what `auto` picks on this machine), `loading` (settings
to loaded models, once, for every page and server) and `classifier` (Task 3's class token and head).

Imports: `sambtcv.core`, `sambtcv.data`.
"""
