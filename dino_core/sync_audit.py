"""Counts, on any device, what a step would cost on an accelerator: host syncs and dispatched ops.

On a GPU, a host sync is any point where Python waits for the device: reading a value
(``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``), an op whose output size depends
on the data (``nonzero``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without a size),
a copy of host data to the device from pageable memory (``torch.tensor(list, device=...)``,
``host_tensor.to(device)``) and a host tensor used as an operand of a device op. On CPU none of them
waits, so :class:`HostSyncAudit` tracks which tensors *would* live on the host and counts those
events as if the tensors on ``device`` were on an accelerator:

* a tensor made by a factory call without ``device=`` (``torch.arange(n)``, ``torch.tensor(x)``,
  ``torch.from_numpy``) or by ``.cpu()`` is a host tensor, and so is every result of ops whose
  tensor operands are all host tensors;
* every other tensor (parameters, inputs, results of ops with a device operand) is a device tensor;
* :func:`dino_core.host_transfer.to_device` is the sanctioned asynchronous copy (pinned, non-blocking):
  its result is a device tensor and it counts as a transfer, not a sync.

Use::

    with HostSyncAudit() as audit:
        step()
    audit.syncs        # Counter of sync kinds, e.g. {"cpu": 1}
    audit.total_syncs  # their sum
    audit.ops          # aten ops dispatched (a proxy for kernel launches)
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from . import host_transfer

_FACTORIES = ("tensor", "as_tensor", "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint",
              "randperm", "linspace", "eye")
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim", "equal"}
_READ_BACK_METHODS = ("tolist", "numpy")


class HostSyncAudit(TorchDispatchMode):
    """Context manager counting would-be host syncs (:attr:`syncs`) and dispatched aten ops (:attr:`ops`)."""

    def __init__(self) -> None:
        super().__init__()
        self._host = WeakIdKeyDictionary()  # host tensors -> True, by identity
        self.syncs: collections.Counter = collections.Counter()
        self.ops = 0
        self.op_counts: collections.Counter = collections.Counter()
        self.transfers = 0
        self._restore: List[Callable[[], None]] = []

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    # -- host/device bookkeeping -----------------------------------------------------------
    def is_host(self, tensor: torch.Tensor) -> bool:
        return tensor in self._host

    def _mark_host(self, result) -> None:
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    def _mark_device(self, result) -> None:
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                self._host.pop(t, None)

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.ops += 1
        name = func.overloadpacket.__name__
        self.op_counts[name] += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs if not self.is_host(t)]
        on_host = [t for t in inputs if self.is_host(t) and t.dim() > 0]
        if name == "_local_scalar_dense" and on_device:
            self.syncs["item"] += 1
        elif name in _DATA_DEPENDENT and on_device:
            self.syncs[name] += 1
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and on_device and any(
                t.dtype == torch.bool for t in inputs[1:]):
            self.syncs["boolean mask index"] += 1
        elif name == "repeat_interleave" and on_device and kwargs.get("output_size") is None:
            self.syncs["repeat_interleave"] += 1
        if on_device and on_host:  # a host operand of a device op is copied over first
            self.syncs["host operand"] += 1
        if inputs and not on_device:
            self._mark_host(result)
        return result

    # -- Python-level entry points -------------------------------------------------------------
    def _patch(self, owner, name: str, wrapper_factory) -> None:
        original = getattr(owner, name)
        setattr(owner, name, wrapper_factory(original))
        self._restore.append(lambda: setattr(owner, name, original))

    def _factory(self, original):
        copies_data = original.__name__ in ("tensor", "as_tensor")

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            data = args[0] if args else kwargs.get("data")
            result = original(*args, **kwargs)
            from_tensor = isinstance(data, torch.Tensor)
            if copies_data and from_tensor and not self.is_host(data):  # a device tensor copied: no host data
                return result
            if kwargs.get("device") is None:
                self._mark_host(result)
                return result
            if copies_data:  # host data (a tensor, or Python values) copied to the device
                self.syncs["host to device copy" if from_tensor else "tensor from host data"] += 1
            self._mark_device(result)
            return result
        return wrapper

    def _from_numpy(self, original):
        def wrapper(array):
            result = original(array)
            self._mark_host(result)
            return result
        return wrapper

    def _read_back(self, original):
        def wrapper(tensor, *args, **kwargs):
            if not self.is_host(tensor):
                self.syncs[original.__name__] += 1
            return original(tensor, *args, **kwargs)
        return wrapper

    def _cpu(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self.is_host(tensor):
                return original(tensor, *args, **kwargs)
            self.syncs["cpu"] += 1
            result = original(tensor.clone(), *args, **kwargs)
            self._mark_host(result)
            return result
        return wrapper

    def _to(self, original):
        def wrapper(tensor, *args, **kwargs):
            result = original(tensor, *args, **kwargs)
            target = kwargs.get("device", kwargs.get("other"))
            for a in args:
                if isinstance(a, (torch.device, str, torch.Tensor)):
                    target = a
            if target is None or not self.is_host(tensor):
                return result
            if isinstance(target, torch.Tensor) and self.is_host(target):
                return result  # host to host
            self.syncs["host to device copy"] += 1
            if result is tensor:  # same storage on CPU: a new object stands for the device copy
                result = tensor.clone()
            self._mark_device(result)
            return result
        return wrapper

    def _transfer(self, original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.transfers += 1
            if self.is_host(result):
                result = result.clone()
            self._mark_device(result)
            return result
        return wrapper

    def __enter__(self):
        for name in _FACTORIES:
            self._patch(torch, name, self._factory)
        self._patch(torch, "from_numpy", self._from_numpy)
        for name in _READ_BACK_METHODS:
            self._patch(torch.Tensor, name, self._read_back)
        self._patch(torch.Tensor, "cpu", self._cpu)
        self._patch(torch.Tensor, "to", self._to)
        self._patch(host_transfer, "to_device", self._transfer)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for restore in reversed(self._restore):
                restore()
            self._restore.clear()

    def report(self) -> Dict[str, int]:
        """``{"host_syncs": n, "ops": n, "transfers": n, <sync kind>: n ...}``."""
        return {"host_syncs": self.total_syncs, "ops": self.ops, "transfers": self.transfers, **self.syncs}
