"""bench.py's sections, a module each: `common` (the machine, phantom slice sets, a script's peak RSS),
`zero_shot` (1), `encoder` (2, 2b), `training` (3, 3b, 4), `scaling` (5), `volumes` (6, 6e), `viewer` (6b),
`protocols` (6c, 6d), `study` (7, 8) and `table` (bench.md's rows against bench.py's TARGETS). bench.py
stays the command: its constants, targets, the flags it checks before any work, and the order of the
sections. A section takes the page's settings and returns its part of bench.json.

Imports: every sub-package (`sambtcv.cli` too); nothing imports it but bench.py and the tests.
"""
