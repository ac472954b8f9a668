"""Merging: mergekit recipes (``recipe``, read by ``safe_yaml``), one small object per method
(``methods``: parameters and their domains, checks, preparation, jobs), greedy soup (``soup``),
Mediator's per-layer sign-conflict analysis as reduction jobs (``mediator``) and Sens-Merging's
calibration scores (``sensitivity``). Each builds plans or statistics for the engine and never
streams by itself.
"""
