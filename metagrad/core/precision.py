"""Mixed precision for meta-learning: which forward passes run under :func:`torch.autocast`.

Parameters, learned inner rates, the outer optimizer's state and BatchNorm running statistics
always stay float32; only the forward passes a policy selects run in bfloat16 or float16
(autocast casts each matmul/convolution's inputs; their backward runs in the same dtype), and
their outputs are returned as float32, so every loss is computed in float32.

A meta-learner runs two kinds of forward pass (:class:`PrecisionPolicy`):

* **support** forwards, whose gradient is the inner step (second order: its graph is
  differentiated again in the meta-backward). The inner gradient is where low precision loses
  accuracy: α·∇L_support is subtracted from θ, and its rounding error is carried into every
  later step and into the meta-gradient.
* **query** forwards (meta-training loss, evaluation), which carry most of the FLOPs when there
  are more queries than support examples; their backward in the meta-gradient is first order.

Precisions (the ``precision`` setting of every learner):

* ``"fp32"``: no autocast at all (the same code path, bit for bit, as without this module).
* ``"bf16"``: query forwards under bfloat16 autocast, the inner loop in float32 (see
  :data:`POLICIES`). Pays only on a device with bfloat16 kernels (a CPU with AVX512-BF16 or
  AMX, a recent GPU); elsewhere it is correct but slower, and warns.
* ``"fp16"``: the same split under float16 autocast, CUDA only (its narrow range needs loss
  scaling: :attr:`metagrad.algorithms.maml.MAML.loss_scale`, e.g. ``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from metagrad.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which forward passes of a meta-learner run under autocast to ``dtype``
    (``None``: none, float32 throughout)."""

    dtype: torch.dtype | None = None
    support: bool = False
    """Support forwards (the inner loop's losses and gradients) under autocast."""
    query: bool = False
    """Query forwards (the meta-training loss, evaluation) under autocast."""

    def autocast(self, device: torch.device, support: bool
                 ) -> contextlib.AbstractContextManager[None]:
        """The context of one forward pass on ``device``: autocast to :attr:`dtype` for a
        support (``support=True``) or query forward that this policy selects, else float32
        (autocast explicitly disabled, so that an enclosing autocast region does not leak in and
        a recomputed inner step runs in the precision it first ran in). float16 off CUDA is a
        :class:`~metagrad.errors.ConfigError`."""
        if self.dtype is None:
            return contextlib.nullcontext()
        if self.dtype == torch.float16 and device.type != "cuda":
            raise ConfigError(f"precision='fp16' runs on CUDA only, but the model is on "
                              f"{device.type!r}; use precision='bf16' or 'fp32'")
        enabled = self.support if support else self.query
        if enabled and self.dtype == torch.bfloat16 and device.type == "cpu" \
                and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn(
                "precision='bf16' on a CPU without bfloat16 kernels (oneDNN needs AVX512-BF16 or "
                "AMX): convolutions fall back to a reference implementation many times slower "
                "than float32; the results are correct but use precision='fp32' here",
                RuntimeWarning, stacklevel=2)
        return torch.autocast(device.type, dtype=self.dtype, enabled=enabled)


POLICIES: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy(),
    "bf16": PrecisionPolicy(torch.bfloat16, support=False, query=True),
    "fp16": PrecisionPolicy(torch.float16, support=False, query=True),
}
"""The policy of each ``precision`` setting. Low precision goes to the query forwards (most of
the FLOPs, first-order in the meta-gradient); the inner loop stays float32 because its gradient
is where the rounding error is amplified into the meta-gradient (see the module doc)."""


def check_precision(precision: object) -> PrecisionPolicy:
    """The policy of ``precision``; a :class:`~metagrad.errors.ConfigError` for an unknown name
    and for ``"fp16"`` on a machine without CUDA (the device a forward runs on is checked again
    by :meth:`PrecisionPolicy.autocast`)."""
    if not isinstance(precision, str) or precision not in POLICIES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "precision='fp16' needs CUDA (float16 autocast with loss scaling), which this "
            "machine does not have; use precision='bf16' (bfloat16 keeps float32's range and "
            "needs no loss scaling) or 'fp32'")
    return POLICIES[precision]


def as_float32(output: Tensor) -> Tensor:
    """A low-precision floating-point ``output`` of an autocast region cast back to float32
    (losses and metrics are computed in float32); any other tensor unchanged."""
    if output.dtype in (torch.bfloat16, torch.float16):
        return output.float()
    return output
