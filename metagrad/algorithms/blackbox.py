"""The black-box meta-learning baseline of the MAML paper (Finn et al. 2017; the memory-augmented
networks of Santoro et al. 2016): a sequence model reads a task's support pairs (x, y) and
predicts the query targets. There are no inner gradient steps; "adaptation" is conditioning on the
support set, so evaluation reports it once, at 0 steps (:meth:`BlackBox.evaluation_curve`):

    min_ψ  E_tasks  L(f_ψ(x_query; support), y_query).

Architecture (one episode = ``S`` support and ``Q`` query examples):

* every input goes through an **encoder**, the body of the task's model (the sinusoid MLP
  1-40-40, the Conv4 feature extractor, …: the model with its ``head`` removed,
  :meth:`BlackBox.from_model`);
* each example becomes a token ``Linear([features, label slot, known])``: the label slot holds the
  one-hot label (classification) or the target value (regression) with ``known = 1`` for support
  examples, and zeros with ``known = 0`` ("unknown") for queries;
* ``layers`` pre-LayerNorm blocks in which **every token attends to the support tokens only**
  (multi-head attention, then a feed-forward layer), so support tokens mix with each other and
  each query reads the support set;
* a linear readout of the query tokens gives logits or values.

Why attention over the support set and not Santoro's LSTM (which reads the episode in order, the
label of step t-1 beside the input of step t): episodes are *sets*. The attention has no positional
encoding, so a query's prediction is invariant to the order of the support set (the episode
samplers order support sets by label, which an LSTM would exploit or be hurt by), and queries never
attend to each other, so a query's prediction does not depend on which other queries are in the
batch (the same property ``transductive=False`` gives MAML). It is the CNP / SNAIL-style reading of
the paper's baseline and batches over tasks as plain tensor operations.

BatchNorm in the encoder (the Conv4 and Omniglot-MLP bodies) follows the module's mode, as in any
ordinary network (no inner step ever changes the encoder's weights): batch statistics in training,
running statistics at evaluation (:meth:`BlackBox.predict`, which evaluation uses); MAML's
``transductive`` setting does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms.base import (
    Capabilities,
    LearnerSettings,
    MetricFn,
    require_integer,
    resolve_options,
)
from metagrad.core.taskbatch import (
    LossFn,
    TaskBatch,
    check_loss_fn,
    check_task_batch,
    describe_typed,
    explained_data_errors,
    scalar_loss,
    task_tensors,
)
from metagrad.errors import ConfigError


@dataclass
class BlackBoxOptions:
    """The black box's sizes (``--blackbox-...`` flags)."""

    blackbox_width: int = field(default=128, metadata={
        "help": "token size of the attention blocks (divisible by blackbox_heads)"})
    blackbox_layers: int = field(default=2, metadata={"help": "number of attention blocks"})
    blackbox_heads: int = field(default=4, metadata={"help": "attention heads per block"})

    def __post_init__(self) -> None:
        for name in ("blackbox_width", "blackbox_layers", "blackbox_heads"):
            require_integer(name, getattr(self, name), 1)
        if self.blackbox_width % self.blackbox_heads:
            raise ConfigError(f"blackbox_width={self.blackbox_width} must be divisible by "
                              f"blackbox_heads={self.blackbox_heads}")


class SupportAttention(nn.Module):
    """One block: every token attends to the first ``support`` tokens, then a feed-forward layer;
    both residual, pre-LayerNorm."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_query = nn.LayerNorm(width)
        self.norm_support = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, h: Tensor, support: int) -> Tensor:
        """``h``: ``[tasks, tokens, width]``, the first ``support`` tokens being the support set."""
        t, n, w = h.shape
        d = w // self.heads
        q = self.query(self.norm_query(h)).view(t, n, self.heads, d).transpose(1, 2)
        kv = self.key_value(self.norm_support(h[:, :support]))
        k, v = kv.view(t, support, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # [tasks, heads, tokens, d]
        h = h + self.out(attended.transpose(1, 2).reshape(t, n, w))
        return h + self.ff(self.norm_ff(h))


class BlackBox(nn.Module):
    """Predicts query targets from the support set in one forward pass (no inner loop).

    Args:
        encoder: maps a batch of inputs ``[N, *x_shape]`` to features ``[N, feature_dim]``.
        feature_dim: the encoder's output size.
        loss_fn: ``loss_fn(output, target) -> scalar`` on flattened queries (``F.cross_entropy``
            for classification, ``F.mse_loss`` for regression).
        classes: number of classes (labels are integers ``0..classes-1``, fed one-hot); ``None``
            for regression, whose targets are ``[..., target_dim]`` values.
        target_dim: regression target size (ignored for classification).
        width: token size; ``heads`` must divide it.
        layers: number of attention blocks.
        heads: attention heads.
    """

    Options: ClassVar[type] = BlackBoxOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        inner_loop=False, first_order=False, learn_inner_lr=False, compile=False,
        checkpoint_inner_steps=False, batching=False, transductive=False, precision=False,
        memory_format=False)

    def __init__(self, encoder: nn.Module, feature_dim: int, loss_fn: LossFn, *,
                 classes: int | None = None, target_dim: int = 1, width: int = 128,
                 layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise ConfigError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        for name, value in (("feature_dim", feature_dim), ("width", width), ("layers", layers),
                            ("heads", heads), ("target_dim", target_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BlackBox {name} must be a positive integer, got {value!r}")
        check_loss_fn(loss_fn)
        if classes is not None and (not isinstance(classes, int) or classes < 2):
            raise ConfigError(f"BlackBox classes must be an integer >= 2 or None (regression), "
                              f"got {classes!r}")
        if width % heads:
            raise ConfigError(f"BlackBox width={width} must be divisible by heads={heads}")
        self.encoder = encoder
        self.loss_fn = loss_fn
        self.classes = classes
        self.label_dim = classes if classes is not None else target_dim
        self.embed = nn.Linear(feature_dim + self.label_dim + 1, width)
        self.blocks = nn.ModuleList(SupportAttention(width, heads, 2 * width)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, self.label_dim)

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: LossFn, *, classes: int | None = None,
                   **kwargs: int) -> BlackBox:
        """The black box whose encoder is ``model`` without its final linear layer ``head`` (the
        project's models: :func:`~metagrad.models.mlp.sinusoid_mlp`,
        :func:`~metagrad.models.conv.omniglot_conv`, …). ``model`` is modified (its head becomes
        the identity); for regression the target size is the head's output size."""
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"BlackBox.from_model needs a model whose last layer is a Linear "
                              f"named 'head', got {type(model).__name__}; build BlackBox(encoder, "
                              "feature_dim, ...) directly")
        model.head = nn.Identity()
        if classes is None:
            kwargs.setdefault("target_dim", head.out_features)
        return cls(model, head.in_features, loss_fn, classes=classes, **kwargs)

    @classmethod
    def from_config(cls, model: nn.Module, loss_fn: LossFn, settings: LearnerSettings,
                    options: Any = None) -> Self:
        """:meth:`from_model` (``model`` loses its head) with ``settings.classes`` classes and
        the sizes of ``options`` (:class:`BlackBoxOptions`), on ``settings.device``. Refuses
        the inner-loop settings (:attr:`capabilities`)."""
        options = resolve_options(cls.Options, options)
        cls.capabilities.check(settings, cls.__name__)
        return cls.from_model(model, loss_fn, classes=settings.classes,
                              width=options.blackbox_width, layers=options.blackbox_layers,
                              heads=options.blackbox_heads).to(settings.device)

    # -- prediction ---------------------------------------------------------------------------
    def _labels(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The label slot of the support tokens: ``[tasks, S, label_dim]``."""
        if self.classes is not None:
            if y.is_floating_point() or y.dim() != 2:
                raise ConfigError(f"classification labels must be integers [tasks, examples], got "
                                  f"{y.dtype} of shape {tuple(y.shape)}")
            if bool((y < 0).any()) or bool((y >= self.classes).any()):
                raise ConfigError(f"labels must lie in 0..{self.classes - 1} (classes="
                                  f"{self.classes}), got {int(y.min())}..{int(y.max())}")
            return F.one_hot(y, self.classes).to(dtype)
        if y.dim() != 3 or y.shape[-1] != self.label_dim:
            raise ConfigError(f"regression targets must be [tasks, examples, {self.label_dim}], "
                              f"got shape {tuple(y.shape)}")
        return y.to(dtype)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Predictions for the queries given the support set, with a leading task dimension:
        ``[tasks, Q, classes]`` logits or ``[tasks, Q, target_dim]`` values (one task: add
        ``.unsqueeze(0)``)."""
        if not isinstance(support_x, Tensor) or not isinstance(query_x, Tensor):
            raise ConfigError("BlackBox encodes one input tensor per example; got "
                              f"{type(support_x).__name__} / {type(query_x).__name__} inputs")
        if support_x.dim() < 2 or query_x.dim() < 2 or support_x.shape[0] != query_x.shape[0]:
            raise ConfigError(f"expected support_x [tasks, S, ...] and query_x [tasks, Q, ...] "
                              f"with the same tasks, got {tuple(support_x.shape)} and "
                              f"{tuple(query_x.shape)}")
        if support_x.shape[2:] != query_x.shape[2:]:
            raise ConfigError(f"support and query examples differ in shape: "
                              f"{tuple(support_x.shape)} vs {tuple(query_x.shape)}")
        if support_y.shape[:2] != support_x.shape[:2]:
            raise ConfigError(f"support_y {tuple(support_y.shape)} does not match support_x "
                              f"{tuple(support_x.shape)}: one target per support input")
        tasks, s = support_x.shape[:2]
        q = query_x.shape[1]
        x = torch.cat([support_x, query_x], dim=1)
        with explained_data_errors(
                lambda: f"the encoder could not process the inputs {describe_typed(x)}",
                self.embed.weight, "the model's parameters"):
            features = self.encoder(x.flatten(0, 1)).reshape(tasks, s + q, -1)
        labels = self._labels(support_y, features.dtype)
        slot = torch.cat([labels, features.new_zeros(tasks, q, self.label_dim)], dim=1)
        known = torch.cat([features.new_ones(tasks, s, 1), features.new_zeros(tasks, q, 1)], dim=1)
        h = self.embed(torch.cat([features, slot, known], dim=-1))
        for block in self.blocks:
            h = block(h, s)
        return self.readout(self.norm(h[:, s:]))

    @torch.no_grad()
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """:meth:`forward` for evaluation: in eval mode (BatchNorm running statistics, so each
        query's prediction depends on the support set and itself only), without a graph; the
        module's mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return self(support_x, support_y, query_x)
        finally:
            self.train(was_training)

    # -- what a trainer calls -----------------------------------------------------------------
    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor) -> Tensor:
        """The query loss, averaged over tasks and queries (the graph is kept)."""
        check_task_batch(support_x, support_y, query_x, query_y)
        out = self(support_x, support_y, query_x)
        return scalar_loss(self.loss_fn, out.flatten(0, 1), query_y.flatten(0, 1))

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        """Accumulates the gradient of the query loss of ``batch`` into ``.grad``; returns it."""
        loss = self.meta_loss(*task_tensors(batch))
        loss.backward()
        return loss.detach()

    def evaluation_curve(self, batch: TaskBatch, max_steps: int, metric: MetricFn,
                         at: Sequence[int] | None = None) -> Tensor:
        """``[tasks, 1]``: ``metric(predictions, query_y)`` of each task, the black box reading
        its support set in eval mode (:meth:`predict`); ``max_steps`` and ``at`` do not apply
        (no inner steps)."""
        check_task_batch(*task_tensors(batch))
        out = self.predict(batch.support_x, batch.support_y, batch.query_x)
        return torch.stack([metric(o, y) for o, y in zip(out, batch.query_y, strict=True)]
                           ).unsqueeze(1)
