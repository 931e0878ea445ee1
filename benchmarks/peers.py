"""MAML meta-gradients with other libraries' public APIs, for benchmarks/bench_peers.py only.

Every builder takes ``(model, loss_fn, lr, steps, first_order)`` and returns ``step(data)``, which
sets ``.grad`` of ``model``'s parameters to the meta-gradient of the mean query loss over the tasks
of ``data = (support_x, support_y, query_x, query_y)`` (leading task dimension), each in the
library's documented idiom (per-task inner loop, per-task ``backward``). BatchNorm layers are in
train mode: they normalise with batch statistics, as metagrad's transductive policy does.

The peers are optional: a missing one is reported by :func:`available` with the reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
from collections.abc import Callable

import torch
from torch.func import functional_call

Step = Callable[[tuple[torch.Tensor, ...]], None]


def _zero(params) -> None:
    for p in params:
        p.grad = None


def plain_loop(model, loss_fn, lr, steps, first_order) -> Step:
    """``torch.autograd.grad(create_graph=True)`` per task on ``functional_call``."""
    names, params = zip(*model.named_parameters(), strict=True)

    def step(data):
        _zero(params)
        n, total = data[0].shape[0], 0.0
        for sx, sy, qx, qy in zip(*data, strict=True):
            fast = list(params)
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, fast, strict=True)), (sx,)), sy)
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
            query = loss_fn(functional_call(model, dict(zip(names, fast, strict=True)), (qx,)), qy) / n
            query.backward()
            total += query.item()
        return total  # the mean query loss
    return step


def metagrad_maml(model, loss_fn, lr, steps, first_order, **kwargs) -> Step:
    """``MAML.meta_gradient``, the call metagrad's trainer makes: when the tasks are looped, each
    task's graph is back-propagated before the next is built, as the peers' idiom does."""
    from metagrad import MAML, TaskBatch
    maml = MAML(model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order, **kwargs)

    def step(data):
        _zero(maml.parameters())
        maml.meta_gradient(TaskBatch(*data))
    return step


def higher_maml(model, loss_fn, lr, steps, first_order) -> Step:
    """``higher.innerloop_ctx`` with a differentiable SGD; first order by detaching the inner
    gradients (``grad_callback``), as higher offers no first-order switch."""
    import higher
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    callback = (lambda grads: [g.detach() for g in grads]) if first_order else None

    def step(data):
        _zero(model.parameters())
        n = data[0].shape[0]
        for sx, sy, qx, qy in zip(*data, strict=True):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fm(sx), sy), grad_callback=callback)
                (loss_fn(fm(qx), qy) / n).backward()
    return step


def torchopt_metasgd(model, loss_fn, lr, steps, first_order) -> Step | None:
    """torchopt's object-oriented ``MetaSGD`` (differentiable in-place updates of the module) with
    ``extract_state_dict``/``recover_state_dict`` between tasks (its MAML example). Second order
    only: MetaSGD has no first-order switch."""
    if first_order:
        return None
    import torchopt
    inner_opt = torchopt.MetaSGD(model, lr=lr)

    def step(data):
        _zero(model.parameters())
        n = data[0].shape[0]
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for sx, sy, qx, qy in zip(*data, strict=True):
            for _ in range(steps):
                inner_opt.step(loss_fn(model(sx), sy))
            (loss_fn(model(qx), qy) / n).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
    return step


def torchopt_functional(model, loss_fn, lr, steps, first_order) -> Step:
    """torchopt's functional API: ``torchopt.sgd`` ``update`` + ``apply_updates(inplace=False)`` on
    ``functional_call``; first order by not creating the graph of the inner gradient."""
    import torchopt
    names, params = zip(*model.named_parameters(), strict=True)
    opt = torchopt.sgd(lr)

    def step(data):
        _zero(params)
        n = data[0].shape[0]
        for sx, sy, qx, qy in zip(*data, strict=True):
            fast = tuple(params)
            state = opt.init(fast)
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, fast, strict=True)), (sx,)), sy)
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                updates, state = opt.update(grads, state, inplace=False)
                fast = tuple(torchopt.apply_updates(fast, updates, inplace=False))
            (loss_fn(functional_call(model, dict(zip(names, fast, strict=True)), (qx,)), qy) / n).backward()
    return step


_L2L_NOTE = ""


def _l2l_maml_class():
    """``learn2learn.algorithms.MAML``. learn2learn 0.2.0's package ``__init__`` imports its vision
    module and so torchvision; where torchvision cannot be loaded (only a CUDA build of it exists
    for torch 2.13 on PyPI, which does not load against the CPU torch), the algorithms subpackage is
    imported on its own (it needs only torch and learn2learn.utils)."""
    global _L2L_NOTE
    try:
        import learn2learn
        return learn2learn.algorithms.MAML, learn2learn.__version__
    except Exception as exc:  # any import failure: try the algorithms alone
        reason = f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("learn2learn is not installed")
    root = next(iter(spec.submodule_search_locations))
    for name, path in (("learn2learn", root),
                       ("learn2learn.algorithms", os.path.join(root, "algorithms"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    maml = importlib.import_module("learn2learn.algorithms.maml")
    version = importlib.import_module("learn2learn._version").__version__
    _L2L_NOTE = f" (package __init__ failed: {reason[:80]}; algorithms imported alone)"
    return maml.MAML, version


def learn2learn_maml(model, loss_fn, lr, steps, first_order) -> Step:
    """``l2l.algorithms.MAML(model, lr, first_order)``; ``clone()`` + ``adapt()`` per task."""
    cls, _ = _l2l_maml_class()
    maml = cls(model, lr=lr, first_order=first_order)

    def step(data):
        _zero(maml.parameters())
        n = data[0].shape[0]
        for sx, sy, qx, qy in zip(*data, strict=True):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(sx), sy))
            (loss_fn(learner(qx), qy) / n).backward()
    return step


PEERS: dict[str, Callable[..., Step | None]] = {
    "torchopt MetaSGD": torchopt_metasgd,
    "torchopt functional": torchopt_functional,
    "higher": higher_maml,
    "learn2learn": learn2learn_maml,
}
_MODULES = {"torchopt MetaSGD": "torchopt", "torchopt functional": "torchopt", "higher": "higher",
            "learn2learn": "learn2learn"}


def available() -> tuple[dict[str, Callable[..., Step | None]], dict[str, str]]:
    """(the peers that import, {package: version or why not})."""
    ok, versions = {}, {}
    for name, builder in PEERS.items():
        module = _MODULES[name]
        try:
            if module == "learn2learn":
                _, version = _l2l_maml_class()
                version += _L2L_NOTE
            else:
                importlib.import_module(module)
                version = importlib.metadata.version(module)
            ok[name] = builder
        except Exception as exc:  # report and go on without this peer
            version = f"unavailable ({type(exc).__name__}: {str(exc)[:100]})"
        versions[module] = version
    return ok, versions
