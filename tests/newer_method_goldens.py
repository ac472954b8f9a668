"""Golden formulas of mergekit's newer merge methods (multislerp, karcher, sce, ram / ramplus_tl),
written step by step in float64 as the papers / mergekit describe the algorithms (not our
Gram-matrix shortcut). Shared by test_newer_methods.py (the ops) and
test_newer_methods_recipes.py (the recipes)."""
import torch


def multislerp_golden(xs, weights, normalize=True, eps=1e-8):
    """Goddard's Multi-SLERP spelled out: unit vectors, weighted mean direction, tangent vectors at
    it, their weighted sum mapped back by the exponential map, times the weighted mean norm."""
    flat = [x.double().reshape(-1) for x in xs]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = torch.stack([f.norm() for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm() + eps
    point = mean * torch.cos(length) + tangent * torch.sin(length) / length
    return (point * (norms * w).sum()).reshape(xs[0].shape)


def karcher_golden(xs, max_iter=10, tol=1e-5):
    """The Karcher mean on the sphere by the textbook fixed point: m <- exp_m(mean of log_m(u_i))."""
    flat = [x.double().reshape(-1) for x in xs]
    norms = [f.norm() for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        logs = []
        for u in units:
            cos = torch.clamp(u @ mean, -1, 1)
            theta = torch.arccos(cos)
            logs.append(torch.zeros_like(u) if theta < tol else theta / torch.sin(theta) * (u - cos * mean))
        step = sum(logs) / len(units)
        size = step.norm()
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * step / size
        mean = mean / mean.norm()
    return (mean * (sum(norms) / len(norms))).reshape(xs[0].shape)


def sce_golden(base, models, select_topk, keep=None):
    """SCE spelled out; ``keep`` (a 0/1 mask) replaces the top-k selection when given."""
    base = base.double()
    taus = [m.double() - base for m in models]
    if keep is not None:
        taus = [t * keep.double() for t in taus]
    elif select_topk < 1:
        stacked = torch.stack(taus)
        variance = ((stacked - stacked.mean(0)) ** 2).mean(0).reshape(-1)
        k = int(int((variance != 0).sum()) * select_topk)
        keep = torch.zeros_like(variance)
        keep[sorted(range(variance.numel()), key=lambda i: (-float(variance[i]), i))[:k]] = 1
        taus = [t * keep.reshape(base.shape) for t in taus]
    energy = torch.tensor([float((t ** 2).mean()) for t in taus], dtype=torch.float64)
    weights = energy / energy.sum() if abs(float(energy.sum())) >= 1e-6 else torch.full_like(energy, 1 / len(taus))
    majority = torch.where(sum(taus) >= 0, 1.0, -1.0).double()
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for w, t in zip(weights, taus):
        agrees = (torch.sign(t) == majority).double()
        numerator += w * agrees * t
        denominator += w * agrees
    return base + numerator / denominator.clamp(min=1e-6)


def ram_golden(base, models, epsilon, r=None, alpha=None):
    """RAM: per entry the mean of the task vectors with |τ| > epsilon (one alone: itself); RAM+
    scales each model's alone-entries by 1 + r·clamp(shared / alone, 0, alpha)."""
    base = base.double()
    taus = [m.double() - base for m in models]
    changed = [t.abs() > epsilon for t in taus]
    count = sum(c.double() for c in changed)
    out = base.clone()
    for t, c in zip(taus, changed):
        alone, shared = c & (count == 1), c & (count > 1)
        scale = 1.0
        if r is not None:
            rho = int(shared.sum()) / max(int(alone.sum()), epsilon)
            scale = 1 + r * min(max(rho, 0.0), alpha)
        out += torch.where(alone, t * scale, 0.0) + torch.where(shared, t / count.clamp(min=1), 0.0)
    return out
