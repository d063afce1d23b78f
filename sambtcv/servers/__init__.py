"""The servers: the viewer (`server`: the app and its settings; `viewer_page` and `viewer_volumes`: its routers;
`sessions`: open volumes and undo, with `jobs` (a walk in its own thread) and `label_maps` (label maps and
downloads)), 3D Slicer's nnInteractive protocol (`slicer`: leases and sessions; `slicer_app`: the app;
`slicer_routes`: its routes; `nnia`: its array framing), and what both HTTP sides share (`http`: one-line errors,
the loopback host check, bodies, a free port).

Imports: every sub-package below: `sambtcv.core`, `data`, `models`, `engine`, `study`.
"""
