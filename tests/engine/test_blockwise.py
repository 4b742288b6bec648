"""Block-wise local learning (``blocks=``): residual and attention networks trained block by block.

Everything here runs without torchvision, timm or ../shared; the timm models and CIFAR-10 are in
tests/engine/test_blockwise_timm.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import weakref

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _nets import fit_quietly, pattern_images
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import zoo
from lightning_tpsgd import LocalLearner, TPSGDDDPStrategy, TPSGDStrategy
from lightning_tpsgd.functional import readout_ce


# ----------------------------------------------------------------------------------------------------------- models
class Wrapped(nn.Module):
    """A module that holds the network as an attribute, as a LightningModule does (``self.net``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyViT(nn.Module):
    """A ViT in miniature: patch embedding, class token, position embedding, pre-norm blocks, final norm, head."""

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 10, patch: int = 4, size: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.Sequential(*[copy.deepcopy(layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class Staged(nn.Module):
    """A ConvNeXt-like layout: stem, ``stages`` container, head; GELU and GroupNorm inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stages = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU()) for _ in range(3)]
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class LongSkip(nn.Module):
    """The stem's output is added again after the second block: a skip across blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = self.layer3(self.layer2(self.layer1(s)) + s)
        return self.head(h.mean(dim=(2, 3)))


def resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Wrapped(zoo.create_model("resnet20", num_classes=10))


def images(n: int = 64, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pattern_images(n, size, seed)


def sgd(lr: float = 0.05):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def names_of(learner: LocalLearner) -> list[str]:
    return [b.name for b in learner.blocks]


def param_names(model: nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------------- choosing blocks
def test_patterns_name_stages_or_residual_blocks_through_the_wrapper():
    x, y = images(8)
    learner = LocalLearner(resnet20(), blocks=["layer*"])
    learner.step(x, y)
    assert names_of(learner) == ["net.layer1", "net.layer2", "net.layer3"]
    assert [b.name for b in learner.hidden] == ["net.layer1", "net.layer2"]
    learner = LocalLearner(resnet20(), blocks=["layer*.*"])
    learner.step(x, y)
    assert names_of(learner) == [f"net.layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert len(learner.hidden) == 8


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (resnet20, ["net.layer1", "net.layer2", "net.layer3"]),
        (lambda: Wrapped(Staged()), ["net.stages.0", "net.stages.1", "net.stages.2"]),
        (lambda: Wrapped(TinyViT()), ["net.blocks.0", "net.blocks.1", "net.blocks.2"]),
        (lambda: LongSkip(), ["layer1", "layer2", "layer3"]),  # torchvision's layout: layer1..N
    ],
    ids=["zoo-resnet20", "stages", "vit-blocks", "layer1..N"],
)
def test_auto_uses_the_models_own_stages(model, expected):
    learner = LocalLearner(model(), blocks="auto")
    assert names_of(learner) == expected


def test_each_block_trains_what_runs_before_it_and_the_output_block_the_head():
    x, y = images(8)
    model = Wrapped(TinyViT())
    learner = LocalLearner(model, blocks="auto")
    learner.step(x, y)
    owned = [param_names(model, b.params) for b in learner.blocks]
    first = {"net.patch_embed.weight", "net.patch_embed.bias", "net.cls_token", "net.pos_embed"}
    assert first < owned[0] and all(n.startswith("net.blocks.0.") for n in owned[0] - first)
    assert all(n.startswith("net.blocks.1.") for n in owned[1])
    assert owned[2] == {
        n for n, _ in model.named_parameters() if n.startswith(("net.blocks.2.", "net.norm", "net.head"))
    }
    every = set().union(*owned)
    assert every == {n for n, _ in model.named_parameters()}
    assert sum(len(o) for o in owned) == len(every)  # nothing owned twice


# ----------------------------------------------------------------------------------------------- locality, memory
def test_each_block_gets_exactly_its_local_gradient():
    """Block k's parameters get the gradient of its own local loss on its detached input, and nothing else."""
    x, y = images(16)
    model = resnet20()
    reference = copy.deepcopy(model).net
    learner = LocalLearner(model, blocks=["layer*"])
    learner.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    out = learner.run(lambda: model(x), y)
    F.cross_entropy(out, y).backward()
    learner.commit_grads()
    W1, W2 = learner.learned_projections()
    x1 = reference.act1(reference.bn1(reference.conv1(x)))
    h1 = reference.layer1(x1)
    readout_ce(F.adaptive_avg_pool2d(h1, 2), y, W1.detach()).backward()
    h2 = reference.layer2(h1.detach())
    readout_ce(F.adaptive_avg_pool2d(h2, 2), y, W2.detach()).backward()
    F.cross_entropy(
        reference.linear(reference.flatten(reference.global_pool(reference.layer3(h2.detach())))), y
    ).backward()
    for (name, p), q in zip(model.net.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_blocks_activations_are_freed_before_the_next_block_runs():
    x, y = images(16)
    model = resnet20()
    live: list[weakref.ref] = []
    alive_at_layer2: list[int] = []

    class Saved:  # what autograd keeps for the backward, tracked by a weak reference
        def __init__(self, t):
            self.t = t

    def pack(t):
        s = Saved(t)
        live.append(weakref.ref(s))
        return s

    def count(module, inputs):
        alive_at_layer2.append(sum(r() is not None for r in live))

    learner = LocalLearner(model, blocks=["layer*"], optimizer=sgd())
    learner.step(x, y)  # the first batch finds the blocks
    handle = model.net.layer2.register_forward_pre_hook(count)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
        learner.step(x, y)
        F.cross_entropy(model(x), y)  # backprop: the stem's and layer1's tensors are still held at layer2
    handle.remove()
    assert alive_at_layer2[0] == 0 and alive_at_layer2[1] > 20


def test_recompute_gives_the_same_steps_and_holds_only_the_sub_block_outputs():
    """recompute=True: the same parameters, readouts and BatchNorm statistics after two steps (dropout masks too),
    and the forward saves for the backward little more than the residual blocks' inputs (a quarter here)."""
    x, y = images(16)
    plain, checkpointed = resnet20(), resnet20()
    plain.net.linear = nn.Sequential(nn.Dropout(0.5), plain.net.linear)  # RNG replayed by the recomputation
    checkpointed.net.linear = copy.deepcopy(plain.net.linear)
    runs = {}
    for name, model, recompute in (("plain", plain, False), ("checkpointed", checkpointed, True)):
        learner = LocalLearner(model, blocks=["layer*"], recompute=recompute, optimizer=sgd())
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            for _ in range(2):
                torch.manual_seed(1)
                learner.step(x, y)
        runs[name] = sum(saved)
        learner.close()
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert "forward" not in vars(checkpointed.net.layer1[0])  # close() gives the units their forward back
    assert runs["checkpointed"] < 0.4 * runs["plain"]


def test_recompute_needs_blocks_that_hold_sub_modules():
    with pytest.raises(ValueError, match=r"recompute=True needs blocks="):
        LocalLearner(resnet20(), recompute=True)
    with pytest.raises(ValueError, match=r"block 'net.layer1.0.bn1' \(BatchNorm2d\) has no sub-module"):
        LocalLearner(resnet20(), blocks=["layer1.0.bn1", "layer2"], recompute=True)
    with pytest.raises(ValueError, match=r"recompute=True cannot run inside a CUDA graph"):
        LocalLearner(resnet20(), blocks="auto", recompute=True, cuda_graph=True)


# ----------------------------------------------------------------------------------------- schedule and state
def test_layerwise_schedule_trains_one_block_per_stage_and_stops_the_forward():
    x, y = images(16)
    model = resnet20()
    learner = LocalLearner(model, blocks=["layer*"], schedule="layerwise", epochs_per_layer=1, optimizer=sgd())
    calls: list[str] = []
    for name in ("layer1", "layer2", "layer3"):
        model.net.get_submodule(name).register_forward_pre_hook(lambda m, i, name=name: calls.append(name))
    learner.step(x, y)  # the first batch runs the whole forward once
    assert learner.num_stages == 3
    for epoch, trained in enumerate(
        (("net.conv1", "net.bn1", "net.layer1."), ("net.layer2.",), ("net.layer3.", "net.linear"))
    ):
        learner.set_epoch(epoch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        calls.clear()
        losses = learner.step(x, y)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.startswith(trained) for n in changed), (epoch, changed)
        assert calls == ["layer1", "layer2", "layer3"][: epoch + 1]
        assert ("loss" in losses) == (epoch == 2)


def test_a_restored_learner_continues_exactly():
    """Readouts and optimizer state round-trip through ``state_dict``: the resumed run matches the uninterrupted one."""
    x, y = images(16)
    model = resnet20()
    learner = LocalLearner(model, blocks=["layer*"], optimizer=sgd())
    for _ in range(2):
        learner.step(x, y)
    state = copy.deepcopy(learner.state_dict())  # as saved: no tensor shared with the running learner
    assert set(state["projections"]) == {"net.layer1", "net.layer2"}
    assert state["projections"]["net.layer1"].shape == (10, 16, 2, 2)
    twin = resnet20(seed=1)
    twin.load_state_dict(model.state_dict())
    restored = LocalLearner(twin, blocks=["layer*"], optimizer=sgd())
    restored.load_state_dict(state)
    for a, b in zip(restored.learned_projections(), learner.learned_projections(), strict=True):
        assert torch.equal(a, b)
    learner.step(x, y)
    restored.step(x, y)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(restored.learned_projections(), learner.learned_projections(), strict=True):
        assert torch.equal(a, b)


def test_block_pool_sets_the_readout_grid_and_tokens_are_averaged():
    x, y = images(8)
    learner = LocalLearner(resnet20(), blocks=["layer*"], block_pool=1, optimizer=sgd())
    learner.step(x, y)
    assert [tuple(W.shape) for W in learner.learned_projections()] == [(10, 16, 1, 1), (10, 32, 1, 1)]
    learner = LocalLearner(Wrapped(TinyViT()), blocks="auto", optimizer=sgd())
    learner.step(x, y)
    assert [tuple(W.shape) for W in learner.learned_projections()] == [(10, 16), (10, 16)]


@pytest.mark.parametrize("rule", ["ce", "l2"])
def test_fixed_target_rules_work_on_pooled_block_outputs(rule):
    x, y = images(16)
    learner = LocalLearner(resnet20(), blocks=["layer*"], rule=rule, optimizer=sgd())
    losses = learner.step(x, y)
    assert set(losses) == {"net.layer1", "net.layer2", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert learner.learned_projections() == []


def test_compile_fuses_the_readout_and_keeps_the_gradients():
    x, y = images(16)
    grads = []
    for compiled in (False, True):
        model = resnet20()
        learner = LocalLearner(model, blocks=["layer*"], compile=compiled)
        learner.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
        F.cross_entropy(learner.run(lambda m=model: m(x), y), y).backward()
        learner.commit_grads()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_every_block():
    x, y = images(16)
    model = resnet20()
    learner = LocalLearner(model, blocks=["layer*"], optimizer=sgd())
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = learner.step(x, y)
    assert set(losses) == {"net.layer1", "net.layer2", "loss"} and all(torch.isfinite(v) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in learner.learned_projections())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_auto_gives_block_readouts_that_start_at_the_projection():
    x, y = images(16)
    for rule, init in (("auto", "projection"), ("learned", "zeros")):  # an explicit rule="learned" starts at zero
        learner = LocalLearner(resnet20(), blocks=["layer*"], rule=rule, optimizer=sgd())
        learner.step(x, y)
        assert [(b.rule.name, b.rule.init) for b in learner.hidden] == [("learned", init)] * 2


def test_overrides_name_blocks():
    x, y = images(16)
    learner = LocalLearner(resnet20(), blocks=["layer*"], overrides={"net.layer2": {"rule": "ce"}}, optimizer=sgd())
    learner.step(x, y)
    assert [type(b.rule).__name__ for b in learner.hidden] == ["LearnedCE", "TPSGDCE"]
    with pytest.raises(ValueError, match=r"overrides name layers that are not hidden.*\['net.layer3'\]"):
        LocalLearner(resnet20(), blocks=["layer*"], overrides={"net.layer3": {"rule": "ce"}}).step(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_block_wise_steps():
    x, y = (t.cuda() for t in images(32))
    model = resnet20().cuda()
    opt = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    eager = copy.deepcopy(model)
    graphed = LocalLearner(model, blocks=["layer*"], cuda_graph=True, optimizer=opt)
    plain = LocalLearner(eager, blocks=["layer*"], optimizer=opt)
    for _ in range(6):  # 3 eager warm-up steps, the capture, replays
        a, b = graphed.step(x, y), plain.step(x, y)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("blocks", "match"),
    [
        (["layer9"], r"'layer9' matches no submodule.*Candidates: 'net'.*'net.layer1'"),
        (["layer*", "layer1.0"], r"blocks nest: 'net.layer1.0' is inside 'net.layer1'"),
        (["layer1"], r"gives 1 block \(net.layer1\).*at least 2"),
        ("layers", r"blocks='layers' is not a valid choice"),
    ],
)
def test_bad_blocks_are_rejected_with_the_candidates(blocks, match):
    with pytest.raises(ValueError, match=match):
        LocalLearner(resnet20(), blocks=blocks)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"blocks": "layers"}, ValueError, r"blocks='layers' is not a valid choice"),
        ({"blocks": [1, 2]}, TypeError, r"blocks must be None, 'auto' or a list"),
        ({"blocks": "auto", "block_pool": 0}, ValueError, r"block_pool must be a positive int"),
        ({"blocks": "auto", "lean": True}, ValueError, r"lean=True cannot work with blocks="),
        ({"blocks": "auto", "output_layers": ["net.linear"]}, ValueError, r"output_layers=.*does not apply"),
        ({"blocks": "auto", "target": "pre"}, ValueError, r"target='pre' does not apply"),
        ({"recompute": True}, ValueError, r"recompute=True needs blocks="),
        ({"blocks": "auto", "recompute": 1}, TypeError, r"recompute must be True or False"),
    ],
)
def test_the_strategies_reject_bad_block_options_when_built(options, error, match):
    for strategy in (TPSGDStrategy, TPSGDDDPStrategy):
        with pytest.raises(error, match=match):
            strategy(**options)


def test_auto_without_a_structure_asks_for_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"recognises no stage structure in Sequential.*Name the blocks.*'0', '2'"):
        LocalLearner(model, blocks="auto")


def test_a_skip_across_blocks_is_an_error_naming_the_parameter():
    x, y = images(8)
    learner = LocalLearner(LongSkip(), blocks="auto")
    with pytest.raises(RuntimeError, match=r"'stem.weight'.*'layer1'.*'layer3'.*skip"):
        learner.step(x, y)


def test_lean_mode_is_rejected():
    with pytest.raises(ValueError, match=r"lean=True.*blocks="):
        LocalLearner(resnet20(), blocks="auto", lean=True)


def test_per_layer_mode_points_residual_networks_to_blocks_auto():
    x, y = images(8)
    with pytest.raises(RuntimeError, match=r"blocks='auto'"):
        LocalLearner(resnet20()).step(x, y)


# --------------------------------------------------------------------------------------------------- the strategy
class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit(module: L.LightningModule, strategy, epochs: int = 1, n: int = 512, **kwargs) -> L.Trainer:
    return fit_quietly(module, strategy, *images(n), epochs=epochs, **kwargs)


@pytest.mark.parametrize(
    "net", [lambda: zoo.create_model("resnet20", num_classes=10), TinyViT], ids=["resnet20", "vit"]
)
def test_strategy_trains_a_residual_or_attention_network_block_wise(net):
    torch.manual_seed(0)
    module = Classifier(net())
    fit(module, TPSGDStrategy(blocks="auto"), epochs=2)
    x, y = images(512, seed=1)
    assert accuracy(module, x, y) > 0.5


def test_strategy_with_recompute_trains_like_without():
    """The same run with recompute=True ends with the same weights; the units get their forward back after fit."""
    modules = []
    for recompute in (False, True):
        torch.manual_seed(0)
        modules.append(Classifier(TinyViT()))
        fit(modules[-1], TPSGDStrategy(blocks="auto", recompute=recompute), n=128)
    for (name, a), b in zip(modules[0].state_dict().items(), modules[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert not any("forward" in vars(m) for m in modules[1].modules())


def test_strategy_resumes_from_a_checkpoint_exactly(tmp_path):
    """Readouts in the checkpoint's "tpsgd" state: 1 epoch + resume = 2 epochs, bit for bit on the CPU."""

    def run(epochs: int, **kwargs) -> Classifier:
        torch.manual_seed(0)
        module = Classifier(zoo.create_model("resnet20", num_classes=10))
        fit(module, TPSGDStrategy(blocks=["layer*"]), epochs=epochs, n=64, shuffle=False, **kwargs)
        return module

    straight = run(2)
    run(1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["tpsgd"]["projections"]
    assert {name: tuple(P.shape) for name, P in saved.items()} == {
        "net.layer1": (10, 16, 2, 2),
        "net.layer2": (10, 32, 2, 2),
    }
    resumed = run(2, ckpt_path=tmp_path / "last.ckpt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L, torch, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    import zoo
    from lightning_tpsgd import TPSGDDDPStrategy

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = zoo.create_model("resnet20", num_classes=10)
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TPSGDDDPStrategy(blocks=["layer*"]), max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    torch.save(module.state_dict(), f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_data_parallel_block_wise_ranks_stay_identical(tmp_path):
    """``tpsgd_ddp`` with 2 CPU processes: each block's local gradients are all-reduced like a layer's."""
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    start = resnet20().net.state_dict()
    parameters = [name for name, _ in Classifier(resnet20().net).named_parameters()]
    for key in parameters:  # buffers: broadcast from rank 0 before each step, so the last step's differ
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert not torch.equal(ranks[0]["net.conv1.weight"], start["conv1.weight"])  # the first block trained
