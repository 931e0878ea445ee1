"""A batch of few-shot tasks as tensors with a leading task dimension, and its checks.

Every task source (sinusoid regression, Omniglot / MiniImageNet episodes, a user's own data set)
produces a :class:`TaskBatch`; every algorithm consumes one. Task ``i`` is
``(support_x[i], support_y[i], query_x[i], query_y[i])``.

Inputs (``support_x``, ``query_x``) are :data:`Inputs`: one tensor, a tuple of tensors (passed to
the model positionally, ``model(*x)``) or a dict of tensors (``model(**x)``), every tensor with
the leading ``[tasks, examples, ...]`` dimensions. Targets are one tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metagrad.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``)."""

Inputs = Tensor | tuple[Tensor, ...] | dict[str, Tensor]
"""A model's input: a tensor, a tuple of tensors (``model(*x)``) or a dict (``model(**x)``)."""


def named_leaves(x: Inputs, name: str) -> list[tuple[str, Tensor]]:
    """The tensors of ``x`` with their names (``support_x``, ``support_x[1]``,
    ``support_x['mask']``); a clear error for anything that is not :data:`Inputs`."""
    if isinstance(x, Tensor):
        return [(name, x)]
    if isinstance(x, tuple):
        leaves = [(f"{name}[{i}]", t) for i, t in enumerate(x)]
    elif isinstance(x, dict):
        leaves = [(f"{name}[{k!r}]", t) for k, t in x.items()]
    else:
        raise ConfigError(f"{name} must be a tensor, a tuple of tensors or a dict of tensors, "
                          f"got {type(x).__name__}")
    if not leaves:
        raise ConfigError(f"{name} is an empty {type(x).__name__}; give the model at least one "
                          "input tensor")
    for leaf_name, t in leaves:
        if not isinstance(t, Tensor):
            raise ConfigError(f"{leaf_name} must be a tensor, got {type(t).__name__}")
    return leaves


def map_inputs(fn: Callable[..., Tensor], x: Inputs, *others: Inputs) -> Inputs:
    """``fn`` applied to each tensor of ``x`` (with the tensors at the same place in ``others``,
    which have the structure of ``x``), keeping the structure."""
    if isinstance(x, Tensor):
        return fn(x, *others)
    if isinstance(x, tuple):
        return tuple(fn(*ts) for ts in zip(x, *others, strict=True))
    return {k: fn(t, *(o[k] for o in others)) for k, t in x.items()}  # type: ignore[index]


def call_arguments(x: Inputs) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` with which the model is called on ``x``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, tuple):
        return x, {}
    if isinstance(x, dict):
        return (), x
    raise ConfigError(f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                      f"got {type(x).__name__}")


def num_tasks(x: Inputs) -> int:
    """The leading (task) dimension of ``x``."""
    return named_leaves(x, "input")[0][1].shape[0]


def task_slices(tasks: tuple[Inputs, ...]) -> Iterator[tuple[Inputs, ...]]:
    """``tasks`` (each with a leading task dimension) one task at a time, without that dimension."""
    for i in range(num_tasks(tasks[0])):
        yield tuple(map_inputs(lambda t, i=i: t[i], x) for x in tasks)


@dataclass(frozen=True)
class TaskBatch:
    """``support_x``: ``[tasks, n_support, *x_shape]``; ``query_x``: ``[tasks, n_query, *x_shape]``
    (or a tuple or dict of such tensors, :data:`Inputs`); targets likewise (tensors)."""

    support_x: Inputs
    support_y: Tensor
    query_x: Inputs
    query_y: Tensor

    def __post_init__(self) -> None:
        n = num_tasks(self.support_x)
        for field in ("support_x", "support_y", "query_x", "query_y"):
            for name, t in named_leaves(getattr(self, field), field):
                if not t.dim() or t.shape[0] != n:
                    raise ValueError(
                        f"TaskBatch: {name} has {t.shape[0] if t.dim() else 'no'} tasks but "
                        f"support_x has {n}; every tensor needs the same leading task dimension"
                    )

    @property
    def num_tasks(self) -> int:
        return num_tasks(self.support_x)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int | slice | Tensor) -> TaskBatch:
        """Tasks selected along the leading dimension (an int keeps a task dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TaskBatch(*(map_inputs(lambda t: t[index], x) for x in self.tensors()))

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TaskBatch:
        """Moves the tensors; ``dtype`` applies to floating-point tensors only."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TaskBatch(*(map_inputs(move, x) for x in self.tensors()))

    def tensors(self) -> tuple[Inputs, Tensor, Inputs, Tensor]:
        """``(support_x, support_y, query_x, query_y)``, the arguments of ``meta_loss``."""
        return self.support_x, self.support_y, self.query_x, self.query_y


def task_tensors(batch: object) -> tuple[Inputs, Tensor, Inputs, Tensor]:
    """``batch.tensors()``, or a clear error when ``batch`` is not a :class:`TaskBatch`."""
    if not isinstance(batch, TaskBatch):
        raise ConfigError(
            f"expected a TaskBatch, got {type(batch).__name__}: sample one from a task "
            "distribution (tasks.sample(n, generator)) or build it as TaskBatch(support_x, "
            "support_y, query_x, query_y) from tensors [tasks, examples, ...]; or call "
            "meta_loss(support_x, support_y, query_x, query_y) with the tensors")
    return batch.tensors()


def check_loss_fn(loss_fn: object) -> None:
    """Refuses a ``loss_fn`` that cannot be called as ``loss_fn(output, target)``."""
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be a function loss_fn(output, target) -> scalar tensor (e.g. "
            f"torch.nn.functional.cross_entropy or mse_loss), got {type(loss_fn).__name__} "
            f"{loss_fn!r:.60}")


_DATA_ERROR_WORDS = ("shape", "size", "dtype", "scalar type", "device")
MISSING_TASK_DIMENSION = (
    "A batch of tasks is [tasks, examples, ...]: if this is one task's examples, add the task "
    "dimension with .unsqueeze(0), or use adapt() for a single task")
INPUT_SHAPES = "each task's inputs are [examples, *input]. " + MISSING_TASK_DIMENSION


@contextlib.contextmanager
def explained_data_errors(what: Callable[[], str], reference: Tensor, role: str,
                          shape_hint: str = INPUT_SHAPES) -> Iterator[None]:
    """Turns the user error behind an exception of a model or a loss called on the user's data
    into a :class:`ConfigError` that says how to fix it: a shape (``shape_hint``), dtype or
    device that does not fit ``reference``, a tensor of the model (``role`` says which, e.g.
    "the model's parameters"). ``what()`` names the call and the data. Other exceptions pass
    unchanged."""
    try:
        yield
    except (RuntimeError, IndexError) as exc:
        message = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".!")
        if not isinstance(exc, IndexError) and not any(w in message for w in _DATA_ERROR_WORDS):
            raise
        dtype = str(reference.dtype).removeprefix("torch.")
        if "device" in message:
            hint = (f"{role} are on {reference.device}: move the data there "
                    f"(.to('{reference.device}'))")
        elif "dtype" in message or "scalar type" in message:
            hint = (f"{role} are {dtype}: convert real-valued data to it (x.to(torch.{dtype})) "
                    "or the model to the data's dtype; class-index targets must be integers "
                    "(torch.long)")
        else:
            hint = shape_hint
        raise ConfigError(f"{what()}: {message}. {hint[0].upper()}{hint[1:]}") from exc


def describe_typed(x: object) -> str:
    """Shapes and dtypes of a tensor or of :data:`Inputs` for error messages: ``(5, 1)
    float64``, ``[0] (5, 3) float32, [1] (5,) int64``."""
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, tuple | dict):
        items = enumerate(x) if isinstance(x, tuple) else x.items()
        return ", ".join(f"[{k!r}] {describe_typed(t)}" for k, t in items)
    return type(x).__name__


def scalar_loss(loss_fn: LossFn, output: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(output, target)`` after :func:`check_output`, refusing a result that is not a
    scalar tensor (a per-example loss would otherwise fail deep inside ``torch.func.grad``) and
    explaining a target the loss cannot take (:func:`explained_data_errors`)."""
    check_output(output, target)
    with explained_data_errors(
            lambda: f"the loss could not compare the model's output {describe_typed(output)} "
                    f"with the targets {describe_typed(target)}", output, "the model's outputs",
            "the targets must fit the output for this loss: class indices [examples] for "
            "cross_entropy, values of the output's shape for mse_loss"):
        loss = loss_fn(output, target)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
               else type(loss).__name__)
        raise ConfigError(
            f"loss_fn must return a scalar tensor (the mean over the examples), got {got}; "
            "reduce it (reduction='mean', or .mean() at the end of your function)")
    return loss


class TaskSampler(Protocol):
    """Anything that draws a :class:`TaskBatch` of ``num_tasks`` tasks from a generator."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def check_pair(x: Inputs, y: Tensor, which: str) -> None:
    """One task's inputs and targets: one target per example of every input tensor."""
    if not isinstance(y, Tensor):
        raise ConfigError(f"{which} targets must be a tensor, got {type(y).__name__}")
    for name, t in named_leaves(x, f"{which} inputs"):
        if t.shape[:1] != y.shape[:1]:
            raise ConfigError(
                f"{which} set: {t.shape[0] if t.dim() else 'a scalar'} inputs but "
                f"{y.shape[0] if y.dim() else 'a scalar'} targets; each input needs one target "
                f"({name} {tuple(t.shape)}, targets {tuple(y.shape)}). {MISSING_TASK_DIMENSION}"
            )


def check_output(output: Tensor, target: Tensor) -> None:
    """Refuses an output and a floating-point target of different shapes that broadcast together
    (``[N, 1]`` against ``[N]`` broadcasts to ``[N, N]``): an element-wise loss would silently
    compare every output with every target. Integer targets (class indices) are not checked."""
    if not (isinstance(output, Tensor) and isinstance(target, Tensor)) or \
            not target.is_floating_point() or output.shape == target.shape:
        return
    try:
        shape = torch.broadcast_shapes(output.shape, target.shape)
    except RuntimeError:
        return  # the loss itself reports incompatible shapes
    raise ConfigError(
        f"the model's output {tuple(output.shape)} and the targets {tuple(target.shape)} differ "
        f"in shape and would broadcast to {tuple(shape)} in the loss, comparing every output "
        f"with every target; give the targets the output's shape (e.g. y.unsqueeze(-1) or "
        f"y.view({', '.join(str(d) for d in output.shape)}))"
    )


def check_task_batch(support_x: Inputs, support_y: Tensor, query_x: Inputs,
                     query_y: Tensor) -> None:
    """Clear errors for the mistakes seen in practice: a missing task dimension, tasks that do not
    line up, support and query examples of different shapes or structures."""
    fields = {"support_x": support_x, "support_y": support_y, "query_x": query_x,
              "query_y": query_y}
    leaves: dict[str, list[tuple[str, Tensor]]] = {}
    for field, value in fields.items():
        if field.endswith("_y") and not isinstance(value, Tensor):
            raise ConfigError(f"{field} must be a tensor, got {type(value).__name__}")
        leaves[field] = named_leaves(value, field)
        for name, t in leaves[field]:
            if t.dim() < 2:
                raise ConfigError(
                    f"{name} has shape {tuple(t.shape)}: expected a leading task dimension and an "
                    "example dimension, [tasks, examples, ...]; for one task use adapt() or add "
                    "a task dimension with .unsqueeze(0)"
                )
    counts = {name: t.shape[0] for field in leaves for name, t in leaves[field]}
    if min(counts.values()) == 0:
        raise ConfigError("the task batch is empty: " + ", ".join(
            f"{k} has {v} tasks" for k, v in counts.items()) + "; sample at least one task")
    if len(set(counts.values())) != 1:
        raise ConfigError(
            "mismatched task dimensions: " + ", ".join(f"{k} has {v}" for k, v in counts.items())
            + " tasks; all need the same leading task dimension"
        )
    first = map_inputs(lambda t: t[0], support_x), map_inputs(lambda t: t[0], query_x)
    check_pair(first[0], support_y[0], "support")
    check_pair(first[1], query_y[0], "query")
    for field in ("support_x", "query_x"):
        for name, t in leaves[field]:
            if t.shape[1] == 0:
                raise ConfigError(f"{name} has no examples (shape {tuple(t.shape)}); "
                                  "each task needs at least one support and one query example")
    if type(support_x) is not type(query_x) or (
            [n.removeprefix("support_x") for n, _ in leaves["support_x"]]
            != [n.removeprefix("query_x") for n, _ in leaves["query_x"]]):
        raise ConfigError(f"support_x and query_x differ in structure: "
                          f"{describe_typed(support_x)} vs {describe_typed(query_x)}; give both "
                          "the same inputs")
    for (s_name, s), (q_name, q) in zip(leaves["support_x"], leaves["query_x"], strict=True):
        if s.shape[2:] != q.shape[2:]:
            raise ConfigError(
                f"support and query examples differ in shape: {s_name} {tuple(s.shape)} vs "
                f"{q_name} {tuple(q.shape)} (dimensions after [tasks, examples] must match)"
            )
    if support_y.shape[2:] != query_y.shape[2:]:
        raise ConfigError(
            f"support and query targets differ in shape: support_y {tuple(support_y.shape)} vs "
            f"query_y {tuple(query_y.shape)}"
        )
