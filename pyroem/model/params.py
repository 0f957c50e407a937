"""The parameters of a fitted mixture, below every module that reads or writes them."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["MixtureParams"]


class MixtureParams(NamedTuple):
    """Mixing weights ``(K,)``, the family's component parameters, and ``active``
    ``(K,)``: the original index of each component (components whose weight
    collapsed are removed, see ``weights_prior``)."""

    weights: torch.Tensor
    components: Any
    active: torch.Tensor
