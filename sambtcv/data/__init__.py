"""Data in and out: `btcv` (BTCV's layouts, the MONAI loading path shared by training and evaluation, CT
windows, the slice frame), `dicom` (DICOM series in, DICOM SEG out), `slices` (the preprocessed slice sets),
`phantom` (the synthetic 13-organ CT), `prompts_file` (prompts as users write them) and `resample` (a labelled
CT to another voxel size).

Imports: `sambtcv.core` only.
"""
