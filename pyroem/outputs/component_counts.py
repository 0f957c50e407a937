"""The candidate numbers of components and the criteria that choose among them
(:mod:`pyroem.outputs.selection`), as the command line reads them.

Kept apart from :mod:`pyroem.outputs.selection`, which fits models, so that the ``pyroem``
command parses and checks its arguments before torch and Pyro are imported.
"""

from __future__ import annotations

from pyroem.errors import SpecError

__all__ = ["CRITERIA", "parse_components"]

#: The criteria :func:`pyroem.outputs.selection.choose_components` takes.
CRITERIA = ("bic", "aic", "loo")


def parse_components(text: str) -> list[int]:
    """``"1..6"`` → ``[1, …, 6]``; ``"2,3,5"`` → ``[2, 3, 5]``; ``"4"`` → ``[4]``.

    Raises:
        SpecError: the text is not a range or list of positive integers.
    """
    try:
        if ".." in text:
            low, high = (int(part) for part in text.split(".."))
            values = list(range(low, high + 1))
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SpecError(
            f"components {text!r} is not a positive integer, a range like 1..6 or a list like 2,3,5"
        )
    return sorted(set(values))
