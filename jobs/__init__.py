"""cutout's submitter half: what to do and what was done (spec, sources, storage, manifest, CLI).

Never imports torch; the worker half lives in ``workers``.
"""
