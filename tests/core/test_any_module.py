"""Any nn.Module adapts: BatchNorm, recurrent and attention layers, tied weights; the meta-model is
never modified; batched (vmap) and looped meta-gradients agree."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MAML
from metagrad.core.batching import (
    _VERIFIED_FIRST_ORDER_ONLY,
    _VERIFIED_SECOND_ORDER,
    CONV_VMAP_MAX_EXAMPLES,
    examples_per_task,
    use_vmap,
    vmap_is_exact,
)
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError

DT = torch.float64


def conv_bn(track=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).to(DT)


def image_tasks(tasks=3, n=6):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(tasks, n, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (tasks, n), generator=g),
            torch.randn(tasks, n, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (tasks, n), generator=g))


def meta_grad(maml, data):
    maml.zero_grad()
    maml.meta_loss(*data).backward()
    return [p.grad.clone() for p in maml.model.parameters()]


def loop_reference(model, loss_fn, lr, data, first_order=False):
    """Per-task unrolled autograd with BatchNorm in batch-statistics mode (no running stats)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, saved = False, m.track_running_stats
    try:
        names, theta = zip(*model.named_parameters())
        total = 0
        for sx, sy, qx, qy in zip(*data):
            loss = loss_fn(torch.func.functional_call(model, dict(zip(names, theta)), (sx,)), sy)
            grads = torch.autograd.grad(loss, theta, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(theta, grads)]
            total = total + loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (qx,)), qy)
        return torch.autograd.grad(total / len(data[0]), theta)
    finally:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = saved


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_batchnorm_auto_batching_is_exact(first_order):
    model = conv_bn()
    data = image_tasks()
    ref = loop_reference(model, F.cross_entropy, 0.4, data, first_order)
    for batching in ("auto", "loop"):
        got = meta_grad(MAML(model, F.cross_entropy, 0.4, first_order=first_order, batching=batching), data)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
    # the conv bias feeds BatchNorm, so its true meta-gradient is 0
    assert got[1].abs().max() < 1e-12
    assert vmap_is_exact(model, first_order)  # BatchNorm as tensor ops under vmap
    assert use_vmap("auto", model, first_order, examples_per_task(data))  # 12 examples: vmapped
    assert not use_vmap("auto", model, first_order)  # unknown task size: a conv net is looped
    forced = meta_grad(MAML(model, F.cross_entropy, 0.4, first_order=first_order,
                            batching="vmap"), data)
    for a, b in zip(forced, ref):
        torch.testing.assert_close(a, b)


def test_mlp_vmap_and_loop_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)).to(DT)
    g = torch.Generator().manual_seed(0)
    data = tuple(torch.randn(4, 7, d, generator=g, dtype=DT) for d in (2, 1, 2, 1))
    v = meta_grad(MAML(model, F.mse_loss, 0.1, inner_steps=2, batching="vmap"), data)
    loop = meta_grad(MAML(model, F.mse_loss, 0.1, inner_steps=2, batching="loop"), data)
    for a, b in zip(v, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _instance(layer_type):
    """A small network on [examples, 2, 6, 6] inputs that exercises ``layer_type``."""
    conv = nn.Conv2d(2, 4, 3)  # -> [examples, 4, 4, 4]
    special = {
        nn.Linear: [nn.Flatten(), nn.Linear(72, 3)],
        nn.Conv2d: [conv],
        nn.MaxPool2d: [conv, nn.MaxPool2d(2)],
        nn.AvgPool2d: [conv, nn.AvgPool2d(2)],
        nn.AdaptiveAvgPool2d: [conv, nn.AdaptiveAvgPool2d(1)],
        nn.GroupNorm: [conv, nn.GroupNorm(2, 4)],
        nn.BatchNorm1d: [nn.Flatten(), nn.Linear(72, 5), nn.BatchNorm1d(5)],
        nn.BatchNorm2d: [conv, nn.BatchNorm2d(4)],
        nn.InstanceNorm2d: [conv, nn.InstanceNorm2d(4, affine=True)],
        nn.LayerNorm: [conv, nn.LayerNorm([4, 4, 4])],
    }
    return nn.Sequential(*(special[layer_type] if layer_type in special else [conv, layer_type()]))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("layer_type", _VERIFIED_SECOND_ORDER + _VERIFIED_FIRST_ORDER_ONLY,
                         ids=lambda t: t.__name__)
def test_verified_layers_vmap_matches_loop(layer_type, first_order):
    """Every layer that 'auto' batches with vmap really gives the loop's meta-gradient."""
    if layer_type in _VERIFIED_FIRST_ORDER_ONLY and not first_order:
        pytest.skip("not batched by vmap in second order (known wrong on torch 2.13)")
    torch.manual_seed(0)
    body = _instance(layer_type)
    assert any(type(m) is layer_type for m in body.modules())
    model = nn.Sequential(body, nn.Flatten(), nn.LazyLinear(1)).to(DT)
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(3, 5, 2, 6, 6, generator=g, dtype=DT), torch.randn(3, 5, 1, generator=g, dtype=DT),
            torch.randn(3, 5, 2, 6, 6, generator=g, dtype=DT), torch.randn(3, 5, 1, generator=g, dtype=DT))
    model(data[0][0])  # materialise the lazy layer
    kw = dict(inner_lr=0.1, inner_steps=2, first_order=first_order)
    v = meta_grad(MAML(model, F.mse_loss, batching="vmap", **kw), data)
    loop = meta_grad(MAML(model, F.mse_loss, batching="loop", **kw), data)
    for a, b in zip(v, loop):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_adaptation_never_modifies_the_meta_model():
    model = conv_bn(track=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = image_tasks()
    for transductive in (True, False):
        maml = MAML(model, F.cross_entropy, 0.4, inner_steps=2, transductive=transductive)
        maml.adapt(data[0][0], data[1][0])
        if transductive:
            maml.meta_loss(*data)
        else:
            with torch.no_grad():
                maml.functional_forward(maml.params(), data[2][0])
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_non_transductive_meta_loss_updates_only_running_statistics(kind):
    """Also for models "auto" would vmap: the in-place updates need the per-task loop (a vmap
    attempt that failed and fell back used to count one batch too many)."""
    if kind == "conv":
        model, loss_fn, data = conv_bn(track=True).train(), F.cross_entropy, image_tasks
    else:
        model, loss_fn, data = mlp(nn.BatchNorm1d(8)).train(), F.mse_loss, vector_tasks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maml = MAML(model, loss_fn, 0.4, inner_steps=1, transductive=False)
    maml.meta_loss(*data())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    # updated from the 3 tasks' query forwards only (support sets use their own statistics)
    assert after["1.num_batches_tracked"].item() == 3
    model.eval()
    snapshot = {k: v.clone() for k, v in after.items()}
    maml.meta_loss(*data())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


class TiedLinear(nn.Module):
    """Weight tying: the decoder uses the encoder's weight (one Parameter in two modules)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class SharedLayer(nn.Module):
    """One Linear applied twice: its parameters are shared between two uses."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 1)
        self.also = self.shared  # the same module registered under two names

    def forward(self, x):
        return self.head(torch.tanh(self.also(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))


class LSTMRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(1).repeat(1, 3, 1))[0][:, -1])


class Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (fused CPU kernel: no double backward)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 3 * 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 1, 2, 2).repeat(1, 2, 1, 2)  # [batch, heads, tokens, 4]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean(dim=(1, 2)))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        t = x.unsqueeze(1).repeat(1, 3, 1)
        return self.head(self.attn(t, t, t)[0].mean(1))


@pytest.mark.parametrize("module_cls", [TiedLinear, SharedLayer, LSTMRegressor, Attention, MHA])
def test_second_order_on_any_module_matches_unrolled_reference(module_cls):
    torch.manual_seed(0)
    model = module_cls().to(torch.float32)
    g = torch.Generator().manual_seed(0)
    data = tuple(torch.randn(2, 5, d, generator=g) for d in (4, 1, 4, 1))
    maml = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=2)
    got = meta_grad(maml, data)
    # independent reference: math attention kernel + plain autograd
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        names, theta = zip(*model.named_parameters())
        total = 0
        for sx, sy, qx, qy in zip(*data):
            fast = list(theta)
            for _ in range(2):
                loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (sx,)), sy)
                fast = [w - 0.1 * gr for w, gr in zip(fast, torch.autograd.grad(loss, fast, create_graph=True))]
            total = total + F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (qx,)), qy)
        ref = torch.autograd.grad(total / 2, theta)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module_cls", [TiedLinear, SharedLayer])
def test_shared_parameters_appear_once_and_stay_leaves(module_cls):
    model = module_cls()
    maml = MAML(model, F.mse_loss)
    assert len(maml.params()) == (5 if module_cls is TiedLinear else 6)
    maml.meta_loss(*(torch.randn(2, 3, d) for d in (4, 1, 4, 1))).backward()
    assert all(p.is_leaf and p.grad is not None for p in model.parameters())


# -- batching="auto": which path is taken, and the fallback on a vmap error ---------------------
class VmapSpy:
    """Wraps ``metagrad.core.batching.vmap`` and ``metagrad.algorithms.maml.per_task``: counts the
    calls of each and the vmap calls that raised."""

    def __init__(self, monkeypatch):
        import metagrad.algorithms.maml as maml_module
        import metagrad.core.batching as batching_module

        self.per_task = self.vmap = self.vmap_errors = 0
        real_vmap, real_per_task = batching_module.vmap, maml_module.per_task

        def vmap(fn, **kw):
            self.vmap += 1
            batched = real_vmap(fn, **kw)

            def call(*args):
                try:
                    return batched(*args)
                except RuntimeError:
                    self.vmap_errors += 1
                    raise
            return call

        def per_task(*args, **kw):
            self.per_task += 1
            return real_per_task(*args, **kw)

        monkeypatch.setattr(batching_module, "vmap", vmap)
        monkeypatch.setattr(maml_module, "per_task", per_task)


def mlp(norm=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), *([norm] if norm else []), nn.Tanh(),
                         nn.Linear(8, 1)).to(DT)


def vector_tasks(tasks=3):
    g = torch.Generator().manual_seed(5)
    return tuple(torch.randn(tasks, 4, d, generator=g, dtype=DT) for d in (3, 1, 3, 1))


@pytest.mark.parametrize(("name", "model", "first_order", "vmapped"), [
    ("mlp", lambda: mlp(), False, True),
    ("mlp", lambda: mlp(), True, True),
    ("small conv", conv_bn, False, True),
    ("small conv", conv_bn, True, True),
    ("large conv", conv_bn, False, False),
    ("large conv", conv_bn, True, False),
    ("layernorm", lambda: mlp(nn.LayerNorm(8)), False, False),
    ("layernorm", lambda: mlp(nn.LayerNorm(8)), True, True),
])
def test_auto_batching_choice_is_taken(monkeypatch, name, model, first_order, vmapped):
    """"auto" = vmap for an MLP and for a conv net on tasks of at most CONV_VMAP_MAX_EXAMPLES
    examples, a loop for a conv net on larger tasks (slower vmapped) and for LayerNorm in second
    order (its vmapped second derivative is wrong on torch 2.13); forced choices are obeyed."""
    model = model()
    half = CONV_VMAP_MAX_EXAMPLES // 2
    data = (image_tasks(n=half) if name == "small conv" else
            image_tasks(n=half + 1) if name == "large conv" else vector_tasks())
    assert use_vmap("auto", model, first_order, examples_per_task(data)) is vmapped
    assert not use_vmap("loop", model, first_order)
    if name == "layernorm" and not first_order:  # forced vmap would be wrong: refused
        with pytest.raises(ConfigError, match="LayerNorm"):
            use_vmap("vmap", model, first_order)
    else:
        assert use_vmap("vmap", model, first_order)
    loss_fn = F.cross_entropy if name.endswith("conv") else F.mse_loss
    spy = VmapSpy(monkeypatch)
    maml = MAML(model, loss_fn, 0.1, inner_steps=1, first_order=first_order, batching="auto")
    maml.meta_loss(*data)
    assert (spy.per_task, spy.vmap, spy.vmap_errors) == (1, int(vmapped), 0)
    maml.zero_grad()
    maml.meta_gradient(TaskBatch(*data))
    grad_auto = [p.grad.clone() for p in model.parameters()]
    # a looped meta-gradient back-propagates task by task, without per_task
    assert spy.per_task == (2 if vmapped else 1) and spy.vmap == 2 * int(vmapped)
    grad_loop = meta_grad(MAML(model, loss_fn, 0.1, inner_steps=1, first_order=first_order,
                               batching="loop"), data)
    for a, b in zip(grad_auto, grad_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class ItemInForward(nn.Module):
    """Verified-exact by promise, but its forward calls ``.item()``, which vmap cannot batch."""

    vmap_exact_forward = True

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        scale = 2.0 if x.abs().sum().item() >= 0 else 1.0
        return self.lin(x) * scale


def test_auto_falls_back_to_the_loop_on_a_vmap_error(monkeypatch):
    torch.manual_seed(0)
    model = ItemInForward().to(DT)
    data = vector_tasks()
    assert use_vmap("auto", model, False)
    spy = VmapSpy(monkeypatch)
    auto = MAML(model, F.mse_loss, 0.1, inner_steps=2, batching="auto")
    loss = auto.meta_loss(*data)
    assert (spy.vmap, spy.vmap_errors) == (1, 1)  # vmap tried, failed, the loop answered
    looped = MAML(model, F.mse_loss, 0.1, inner_steps=2, batching="loop")
    torch.testing.assert_close(loss, looped.meta_loss(*data), rtol=1e-12, atol=0)
    for a, b in zip(meta_grad(auto, data), meta_grad(looped, data), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert spy.vmap_errors == 2
    with pytest.raises(RuntimeError):  # a forced vmap does not hide the error
        MAML(model, F.mse_loss, 0.1, inner_steps=2, batching="vmap").meta_loss(*data)
