"""Analysis of saved adapters: sharpness, Hessian spectra, balancedness, landscapes (see ANALYSIS.md).

Filled by the analysis issues; the training side lives in :mod:`flatlora`.
"""
