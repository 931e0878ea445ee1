"""Functional view of an ``nn.Module``: parameters and buffers as explicit dicts.

The meta-model's own tensors are never written: adaptation produces *new* tensors that take the
place of the module's own for one forward pass (:class:`FunctionalModel`, the semantics of
:func:`torch.func.functional_call`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

Params = dict[str, Tensor]
"""Parameter name (as in ``module.named_parameters()``) -> tensor."""

ParamSelector = Callable[[str, Tensor], bool] | str | list[str] | tuple[str, ...] | None


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``) is running (read from torch's
    private state, present in torch 2.13; ``True`` when it cannot be read)."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:
        return True


def model_params(model: nn.Module) -> Params:
    """The model's parameters by name; a parameter shared by two layers appears once."""
    return dict(model.named_parameters())


def select_names(params: Mapping[str, Tensor], selector: ParamSelector) -> list[str]:
    """Names chosen by ``selector``: ``None`` (all), a prefix string (``"head"`` selects
    ``head.weight`` and ``head.bias``), a list of names/prefixes, or a predicate
    ``(name, tensor) -> bool``."""
    if selector is None:
        names = list(params)
    elif callable(selector):
        names = [n for n, p in params.items() if selector(n, p)]
    else:
        prefixes = [selector] if isinstance(selector, str) else list(selector)
        names = [
            n for n in params if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)
        ]
    return names


@contextlib.contextmanager
def batch_norm_uses_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Transductive BatchNorm: every ``_BatchNorm`` layer normalises with the statistics of the
    batch it is given and neither reads nor updates its running buffers (the behaviour of the MAML
    paper's code). Restores each layer's flags on exit."""
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            saved.append((module, module.training, module.track_running_stats))
            module.training = True
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, training, track in saved:
            module.training = training
            module.track_running_stats = track


@contextlib.contextmanager
def double_backward_kernels(enabled: bool) -> Iterator[None]:
    """Routes ``scaled_dot_product_attention`` to its composite (math) kernel, whose backward is
    differentiable again; the fused CPU flash kernel has no double backward."""
    if not enabled:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _alias_map(named: list[tuple[str, Tensor]], model: nn.Module) -> dict[str, list[str]]:
    """For each tensor reachable under several names, the extra names through which a *different*
    module holds it (weight tying). A module registered twice (``self.b = self.a``) shares its
    attributes already, so those names are left out: listing them would set and restore one
    attribute twice, which leaves the adapted tensor in place (torch 2.13 ``functional_call``
    with ``tie_weights=True`` does exactly that)."""
    first: dict[int, str] = {}
    seen_slots: set[tuple[int, str]] = set()
    aliases: dict[str, list[str]] = {}
    for name, tensor in named:
        owner_path, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner_path)), attr)
        if slot in seen_slots:
            continue
        seen_slots.add(slot)
        if id(tensor) in first:
            aliases.setdefault(first[id(tensor)], []).append(name)
        else:
            first[id(tensor)] = name
    return aliases


class FunctionalModel:
    """``model`` evaluated with explicit parameters and buffers, with tied and shared tensors kept
    tied: the given tensors take the place of the module's own in its parameter and buffer tables
    for one call (as :func:`functional_call` does) and the originals are put back after it, also
    when the forward raises. The module itself is only borrowed for the call."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self._aliases = _alias_map(
            list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False)),
            model,
        )

    def params(self) -> Params:
        return model_params(self.module)

    def buffers(self) -> dict[str, Tensor]:
        """Copies of the buffers, so that a forward in train mode cannot write the model's."""
        return {n: b.clone() for n, b in self.module.named_buffers()}

    def __call__(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], *args: Any,
                 **kwargs: Any) -> Any:
        tensors = {**buffers, **params}
        for name, extra in self._aliases.items():
            if name in tensors:
                tensors.update(dict.fromkeys(extra, tensors[name]))
        slots = None if torch.compiler.is_compiling() else self._slots(tensors)
        if slots is None:
            return functional_call(self.module, tensors, args, kwargs, tie_weights=False,
                                   strict=False)
        saved = []
        try:
            for (table, attr), tensor in zip(slots, tensors.values(), strict=True):
                saved.append((table, attr, table[attr]))
                table[attr] = tensor
            return self.module(*args, **kwargs)
        finally:
            for table, attr, original in reversed(saved):
                table[attr] = original

    def _slots(self, tensors: Mapping[str, Tensor]) -> list[tuple[dict[str, Any], str]] | None:
        """For each name, the ``_parameters`` or ``_buffers`` table and key that hold it in the
        module as it is now (looked up on every call, so a replaced submodule is seen):
        :func:`functional_call`'s swap without its per-tensor checks. ``None`` (use
        :func:`functional_call`) when a name is not a registered parameter or buffer."""
        owners: dict[str, nn.Module] = {}
        slots = []
        for name in tensors:
            path, _, attr = name.rpartition(".")
            owner = owners.get(path)
            if owner is None:
                owner = self.module
                for part in path.split(".") if path else ():
                    owner = owner._modules.get(part)
                    if owner is None:
                        return None
                owners[path] = owner
            if attr in owner._parameters:
                slots.append((owner._parameters, attr))
            elif attr in owner._buffers:
                slots.append((owner._buffers, attr))
            else:
                return None
        return slots
