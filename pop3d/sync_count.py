"""Count the calls that force a host-device synchronisation, on any device (a CPU proxy for CUDA).

On CUDA, ``torch.cuda.set_sync_debug_mode`` sees the real synchronisations; on CPU nothing synchronises, so
:class:`SyncCounter` (a ``TorchFunctionMode``) counts the calls that would: reading a device tensor on the
host (``item``, ``tolist``, ``bool()/int()/float()``, ``cpu``, ``numpy``), ops whose output size depends on
the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing and assignment, one-argument
``where``, ``repeat_interleave`` without ``output_size``), and host->device copies from pageable memory
(``torch.tensor``/``as_tensor``/``new_tensor`` with a device, indexing with a Python list, ``.to(device)``
of a host tensor).

Which tensors would live on the host in a CUDA run? Tensors created by factory calls without a ``device``
(``torch.rand(n, generator=g)``, ``torch.arange(3)``, ``torch.tensor(x)``, ``from_numpy``) are *host*;
outputs of ops whose tensor inputs are all host stay host; everything else (parameters, the batch the step
received, ops touching them, factories given a ``device``) is *device*. Reads of host tensors are not counted.

    with SyncCounter() as sc:
        step()
    print(sc.total, sc.by_site())   # {"file.py:123 item": 2, ...}
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
          "argwhere", "unique", "unique_consecutive", "masked_select"}
_FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn",
              "randint", "randperm", "eye", "from_numpy", "zeros_like", "ones_like", "empty_like", "full_like",
              "rand_like", "randn_like"}
_CONSTANTS = {"tensor", "as_tensor"}
_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _has_list_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, list) for i in items)


def _site() -> str:
    """file:line of the first frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "/torch/" not in f and f != __file__:
            return f"{'/'.join(f.split('/')[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


class SyncCounter(TorchFunctionMode):
    """TorchFunctionMode counting sync-forcing calls on (would-be) device tensors; see the module docstring."""

    def __init__(self, host_tensors=()) -> None:
        """host_tensors: tensors created before the mode that live on the host in a CUDA run too (e.g. the
        optimiser's ``state["step"]`` counters, which torch keeps on the CPU unless capturable/fused)."""
        super().__init__()
        self.sites: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}
        self._mark_host(list(host_tensors))

    # ---- host tensor bookkeeping ---------------------------------------------------------------------
    def _mark_host(self, out) -> None:
        for t in _tensors(out, []):
            key = id(t)
            self._host[key] = weakref.ref(t, lambda _r, k=key: self._host.pop(k, None))

    def _is_host(self, t: torch.Tensor) -> bool:
        r = self._host.get(id(t))
        return r is not None and r() is t

    def _count(self, what: str) -> None:
        self.sites[f"{_site()} {what}"] += 1

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def by_site(self) -> dict[str, int]:
        return dict(self.sites)

    # ---- the mode --------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        ins = _tensors(args, []) + _tensors(kwargs, [])
        all_host = bool(ins) and all(self._is_host(t) for t in ins)
        dev_in = [t for t in ins if not self._is_host(t)]
        has_device = kwargs.get("device") is not None
        h2d = name in ("to", "cuda") and bool(ins) and self._is_host(ins[0]) and (
            has_device or name == "cuda" or any(isinstance(a, (torch.device, str)) for a in args[1:])
            or any(isinstance(a, torch.Tensor) and not self._is_host(a) for a in args[1:]))

        if name in _READS and dev_in:
            self._count(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and dev_in:
            index = args[1] if len(args) > 1 else None
            if _has_bool_index(index) or (name.startswith("index_put") and _has_bool_index(tuple(index or ()))):
                self._count(f"{name}[bool mask]")
            elif _has_list_index(index):
                self._count(f"{name}[python list] (H2D index copy)")
        elif name == "where" and len(args) + len(kwargs) == 1 and dev_in:
            self._count("where(cond)")
        elif name == "repeat_interleave" and "output_size" not in kwargs and dev_in \
                and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self._count("repeat_interleave(tensor repeats)")
        elif name in _CONSTANTS and has_device:
            self._count(f"{name}(data, device=...) (H2D copy)")
        elif name == "new_tensor" and dev_in:
            self._count("new_tensor (H2D copy)")
        elif h2d:
            self._count(f"{name} of a host tensor (H2D copy)")

        out = func(*args, **kwargs)

        if name in _FACTORIES and name not in _LIKE:
            if not has_device:
                self._mark_host(out)
        elif name in _LIKE:
            if ins and self._is_host(ins[0]) and not has_device:
                self._mark_host(out)
        elif h2d:
            pass  # a copy to the device: the result is a device tensor
        elif all_host:
            self._mark_host(out)
        return out
