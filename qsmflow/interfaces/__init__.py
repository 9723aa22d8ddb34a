"""nipype interfaces: each loads NIfTI, calls one qsmflow function, saves NIfTI and provenance."""
