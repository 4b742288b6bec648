"""Small models and batches shared by the engine tests."""

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.LeakyReLU(),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Dropout(0.0),
        nn.Linear(16, 10),
    )


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.LeakyReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10),
    )


def batch(n=8, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def aten_counts(fn, steps=2):
    """aten ops dispatched by ``fn()`` per call, by name (after two warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn(), fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    counts: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("aten::"):
            counts[event.name] = counts.get(event.name, 0) + 1 / steps
    return counts


def local_grads(learner):
    """The local gradients of the last forward as the optimizer gets them (``commit_grads``), by block index."""
    learner.commit_grads()
    return {b.index: [p.grad for p in b.params] for b in learner.hidden}


def pattern_images(n: int = 64, size: int = 16, seed: int = 0, noise: float = 0.7):
    """A learnable image task: a smooth random pattern per class (the same for every seed), plus noise."""
    import torch.nn.functional as F

    templates = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(templates, size=size, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + noise * torch.randn(n, 3, size, size, generator=g), y


def fit_quietly(module, strategy, x, y, *, epochs=1, batch_size=32, shuffle=True, ckpt_path=None, **trainer_kwargs):
    """``Trainer.fit`` on the CPU without logger, checkpoints, progress bar or summary; returns the Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=epochs,
        enable_model_summary=False,
        **{**quiet, **trainer_kwargs},
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle), ckpt_path=ckpt_path)
    return trainer
