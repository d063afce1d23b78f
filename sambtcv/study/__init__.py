"""The study: `training` (the loop, checkpoints), `evaluation` (the Dice loop), `baseline_nets` (Table 3's
baselines), `records` (a result written once with its settings), `tables` (the contract's tables as views of
records), `report` (REPORT.md) and `stages` (the report's stage runner).

Imports: `sambtcv.core`, `sambtcv.data`, `sambtcv.models`, `sambtcv.engine`.
"""
