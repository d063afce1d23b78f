"""sam-btcv's shared machinery: everything the pages at the repository's root (the scripts users run and
edit) have in common. It knows no command-line flags (but `sambtcv.cli`, which turns a page's constants
into flags); its functions raise `sambtcv.core.errors.PipelineError` about values, and nothing here runs at
import.

The sub-packages, from the bottom up; a module imports only from its own sub-package and those listed
before it (`LAYERS`; tests/test_architecture.py checks it, docs/ARCHITECTURE.md draws it):

- ``core``: errors, defaults and profiles (``config``), organ names, atomic files, devices and seeds,
  torchrun, the one Dice, box and point geometry.
- ``data``: data in and out: BTCV layouts and the MONAI loading path (``btcv``), DICOM, slice sets, the
  phantom, prompts files, resampling.
- ``models``: SAM-family backbones and their input frame, the prompt decoder, the embedding cache, the
  runtimes (PyTorch, OpenVINO) and precisions, the one place settings become loaded models (``loading``),
  Task 3's classifier.
- ``engine``: the interactive engine: walks and their guard, anchors, the editor, 3D propagation, the
  challenge's protocol, whole volumes.
- ``study``: the study's training, evaluation, baselines, records, tables and report.
- ``servers``: the viewer's HTTP API and sessions, 3D Slicer's nnInteractive protocol.
- ``bench``: bench.py's sections.
- ``cli`` (a module): the pages' command line; above everything but ``bench``.
"""

LAYERS = ("core", "data", "models", "engine", "study", "servers", "cli", "bench")
