"""Figures and HTML reports: per subject (participant level), per group and for the atlas."""
