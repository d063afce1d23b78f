"""What every other sub-package stands on: `errors` (PipelineError, the one-line failure), `config` (shared
defaults, profiles/*.toml), `names` (organs, prompt types, choices), `files` (atomic writes, locks,
checkpoints, output names), `device` (devices, seeds, autocast), `distributed` (torchrun), `metrics` (the one
Dice, HD95, surface Dice) and `prompts` (boxes and points from masks; XYXY pixel boxes).

Imports: nothing of sambtcv outside `core`.
"""
