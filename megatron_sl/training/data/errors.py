"""The one exception type of the data pipeline.

``DataError`` is raised for every user-facing data problem (missing or corrupt files, a bad key,
an empty corpus, an unusable tokenizer, no reachable corpus source). Its message names the bad
value; the ``prepare-data`` CLI turns it into exit code 2.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data input, output or source is unusable; the message says which and why."""
