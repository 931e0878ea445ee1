"""Central finite differences, the independent reference for analytic meta-gradients."""

import torch


def central_differences(fn, params, eps=1e-6):
    """d fn() / d params, element by element: (fn(θ + ε) − fn(θ − ε)) / 2ε, flattened."""
    out = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = fn().item()
                flat[j] = old - eps
                down = fn().item()
                flat[j] = old
                out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=params[0].dtype)
