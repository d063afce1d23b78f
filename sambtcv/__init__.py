"""sam-btcv's shared machinery: everything the pages at the repository's root (the scripts users run and
edit) have in common. It knows no command-line flags (but `sambtcv.cli`, which turns a page's constants
into flags); its functions raise `sambtcv.errors.PipelineError` about values, and nothing here runs at
import.

Where things live (from the data to the report):

- ``config``: shared defaults and the profiles (profiles/*.toml); ``cli``: the pages' command line.
- ``errors``, ``files`` (atomic writes, locks, checkpoints, output names), ``device`` (device, seeds, autocast).
- ``names`` (organs, prompt types), ``prompts`` (prompts from masks), ``metrics`` (the one Dice, HD95).
- ``data`` (layouts, the MONAI loading path, slice frame), ``phantom`` (the synthetic CT), ``slices``.
- ``backbones`` (registry, InputFrame), ``decoder`` (batched prompt decoder), ``classifier`` (Task 3's model).
- ``embeddings`` (the cache), ``evaluation`` (dataset, Dice loop), ``training`` (the loop, checkpoints),
  ``distributed`` (torchrun), ``baseline_nets`` (Table 3's baselines).
- ``propagation`` (3D from 2D), ``volume`` (a CT, prompts, label maps, 3D scores), ``prompts_file``.
- ``records`` (results as records), ``tables`` (the contract's tables as views), ``report`` (REPORT.md),
  ``stages`` (the report's stage runner).
"""
