"""The interactive engine: `propagation` (2D masks to 3D, the volume decoder), `guard` (what a walk's next
mask may be, in mm), `walks`, `anchors` (what was given per slice), `editor` (boxes, clicks, strokes and
repairs), `states` (an organ's state on disk), `background` (the model gate and background encoding),
`segfm` / `protocol` (the SEGFM3D challenge's files and steps), `volume` (a whole CT, its prompts and label
maps) and `interactive` (the engine the viewer and the pages share).

Imports: `sambtcv.core`, `sambtcv.data`, `sambtcv.models`.
"""
