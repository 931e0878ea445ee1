"""Memory layout of image batches: which forward passes of a meta-learner feed channels-last
(NHWC) tensors to a convolutional model.

The layout changes no value of the maths, only the order in which the kernels read and write
memory. oneDNN's CPU convolutions (the ``brgconv`` kernels of AVX-512 CPUs) run on NHWC
activations directly, while on NCHW ones every convolution reorders its input, output and
gradients to and from a blocked layout. A channels-last input makes the first convolution's
output channels-last, and PyTorch keeps that layout through BatchNorm, ReLU, pooling and the
following convolutions, so the reorders disappear from the whole network.

A policy converts the inputs of the query forwards (the meta-training loss and evaluation),
which carry most of the FLOPs, and leaves the inner loop's support forwards as given, for two
measured reasons (BENCHMARKS.md, "Channels-last query passes"):

* speed: a forward and its backward are faster in NHWC, but differentiating the graph of a
  gradient again (a second-order inner step's support loss) is slower;
* accuracy: NHWC kernels round differently, and a rounding difference in the inner gradient is
  amplified by α into θ' and from there into the meta-gradient (on the Omniglot benchmarks
  the float32 meta-gradient was 3–5× further from float64 with NHWC support and query passes
  than with NHWC query passes only).

Settings (``memory_format`` of every learner):

* ``"auto"``: channels-last on CPU for a model that has a 2-d convolution and is built only
  from layers known to compute the same values in either layout (:func:`channels_last_safe`);
  the contiguous layout otherwise and on other devices (never measured there).
* ``"channels_last"``: on any device and for any model, whose code the user vouches for: an
  NHWC activation cannot be ``.view``-ed as if it were NCHW (PyTorch raises an error).
* ``"contiguous"``: inputs are passed as given.

Tasks batched by ``vmap`` are never converted: a vmapped convolution with per-task weights is a
grouped convolution, which does not gain from the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from metagrad.core.batching import ELEMENTWISE_LAYERS
from metagrad.core.functional import functorch_transform_active
from metagrad.core.taskbatch import Inputs, map_inputs
from metagrad.errors import ConfigError

MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = get_args(MemoryFormat)

# Layers whose kernels accept any strides and compute the same values in either layout (their
# outputs keep the input's layout): the models ``"auto"`` converts are built only from these,
# containers that merely chain them (nn.Sequential's forward), and classes that set
# ``channels_last_safe = True``.
_LAYOUT_AGNOSTIC = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.GroupNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d,
    nn.Linear, *ELEMENTWISE_LAYERS,
)


def channels_last_safe(model: nn.Module) -> bool:
    """Whether every submodule of ``model`` computes the same values on channels-last inputs:
    a layer of a known layout-agnostic type, a container whose forward is ``nn.Sequential``'s,
    or a class that declares ``channels_last_safe = True`` (a promise that its own forward
    reshapes with ``reshape``/``flatten``, never ``view``, and reads no raw memory)."""
    def safe(module: nn.Module) -> bool:
        return (type(module) in _LAYOUT_AGNOSTIC
                or getattr(type(module), "channels_last_safe", False)
                or (isinstance(module, nn.Sequential)
                    and type(module).forward is nn.Sequential.forward))
    return all(safe(m) for m in model.modules())


def exactly_channels_last(x: Tensor) -> Tensor:
    """A 4-d tensor with NHWC strides, also when it has one channel (where NCHW strides pass
    ``is_contiguous(memory_format=torch.channels_last)`` too, yet a convolution keeps such an
    input's output NCHW). Differentiable; a tensor already in that layout is returned as is."""
    if x.stride() == _channels_last_strides(x.shape):
        return x
    return x.clone(memory_format=torch.channels_last)


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c)


@dataclass(frozen=True)
class LayoutPolicy:
    """Which forward inputs become channels-last: none unless ``channels_last``; with
    ``cpu_only``, only tensors on the CPU."""

    channels_last: bool = False
    cpu_only: bool = True

    def prepare(self, x: Inputs, support: bool) -> Inputs:
        """``x`` with each 4-d floating-point tensor converted to exact NHWC strides
        (:func:`exactly_channels_last`), unless the policy is off, ``x`` is a support set of
        the inner loop (``support``), or a ``torch.func`` transform is running (tasks batched
        by ``vmap``)."""
        if not self.channels_last or support or functorch_transform_active():
            return x

        def convert(t: Tensor) -> Tensor:
            if t.dim() != 4 or not t.is_floating_point() or (
                    self.cpu_only and t.device.type != "cpu"):
                return t
            return exactly_channels_last(t)

        return map_inputs(convert, x)


def layout_policy(memory_format: object, model: nn.Module) -> LayoutPolicy:
    """The policy of a ``memory_format`` setting for ``model`` (see the module doc); a
    :class:`~metagrad.errors.ConfigError` for an unknown setting."""
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got "
                          f"{memory_format!r}")
    if memory_format == "channels_last":
        return LayoutPolicy(channels_last=True, cpu_only=False)
    if memory_format == "auto":
        convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
        return LayoutPolicy(channels_last=convolutional and channels_last_safe(model))
    return LayoutPolicy()
