"""Merging: mergekit recipes (``recipe``), the layer-level methods of the seeds (``mediator``:
per-layer sign-conflict analysis as reduction jobs; ``sensitivity``: Sens-Merging's calibration
scores). Each builds plans or statistics for the engine and never streams by itself.
"""
