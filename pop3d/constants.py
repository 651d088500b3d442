"""Small constant tensors built once per (values, device, dtype) instead of per call.

``torch.tensor(list, device="cuda")`` inside a forward is a pageable host->device copy, which synchronises
the stream every time it runs. :func:`device_constant` builds the tensor on the first call and returns the
same tensor afterwards. The tensors are shared: never modify them in place.
"""
from __future__ import annotations

import torch

_CACHE: dict[tuple, torch.Tensor] = {}
_MAX_ENTRIES = 512


def device_constant(values, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``torch.tensor(values, dtype=dtype, device=device)``, cached (values: nested tuples/lists
    of Python numbers). Built outside inference mode, so it can enter autograd graphs too."""
    key = (_freeze(values), str(torch.device(device)), dtype)
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        with torch.inference_mode(False), torch.no_grad():
            t = torch.tensor(values, dtype=dtype, device=device)
        _CACHE[key] = t
    return t


def _freeze(values):
    if isinstance(values, (list, tuple)):
        return tuple(_freeze(v) for v in values)
    return float(values) if isinstance(values, float) else values
