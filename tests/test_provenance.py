"""Sidecar provenance: every algorithm's paper comes from its docstring's References section."""
import re

import pytest

from qsmflow.config import ALGORITHM_STAGES, registry
from qsmflow.interfaces.base import docstring_references, function_provenance
from qsmflow.recon.echoes import r2star_map
from qsmflow.recon.masking import reliable_field_mask
from qsmflow.recon.unwrap import unwrap_echoes

FUNCTIONS = [(f"{stage}.{name}", function) for stage in ALGORITHM_STAGES for name, function in registry(stage).items()]
FUNCTIONS += [("r2star", r2star_map), ("reliability mask", reliable_field_mask), ("temporal unwrapping", unwrap_echoes)]


@pytest.mark.parametrize("name, function", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_every_algorithm_cites_its_papers(name, function):
    references = function_provenance(function, {})["References"]
    assert references, f"{function.__module__}.{function.__name__}: add a References section to its docstring"
    for entry in references:
        assert isinstance(entry, str) and re.search(r"\b(19|20)\d\d;", entry), entry  # journal-style year;volume
        assert ".. [" not in entry and "\n" not in entry and "  " not in entry


def test_references_section_is_parsed_up_to_the_next_section():
    def documented():
        """Summary.

        References
        ----------
        .. [1] Author A, Author B. A title that is long enough to be
               wrapped. J Imaginary 2001;1:1-2.
        .. [2] Author C. J Imaginary 2002;2:3-4.

        Examples
        --------
        >>> documented()
        """

    def plain():
        """Summary.

        References
        ----------
        Author D. J Imaginary 2003;3:5-6.

        Author E. J Imaginary 2004;4:7-8.
        """

    assert docstring_references(documented) == [
        "Author A, Author B. A title that is long enough to be wrapped. J Imaginary 2001;1:1-2.",
        "Author C. J Imaginary 2002;2:3-4.",
    ]
    assert docstring_references(plain) == ["Author D. J Imaginary 2003;3:5-6.", "Author E. J Imaginary 2004;4:7-8."]
    assert docstring_references(lambda: None) == []
