"""Group statistics: trajectory models, profile likelihood, bootstrap and normative centiles.

Pure functions on arrays and tables; no nipype and no file I/O.
"""
