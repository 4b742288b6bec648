import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_tpsgd
from lightning_tpsgd import TPSGDStrategy


class Net(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about tpSGD."""

    def __init__(self, loss_factor: float = 1.0, lr: float = 0.1):
        super().__init__()
        self.loss_factor, self.lr = loss_factor, lr
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.LeakyReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return self.loss_factor * loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n=64, batch_size=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size
    )


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_import_registers_the_strategy_name():
    assert "tpsgd" in StrategyRegistry
    assert lightning_tpsgd.TPSGDStrategy is TPSGDStrategy
    assert isinstance(trainer(strategy="tpsgd").strategy, TPSGDStrategy)


def test_scaling_the_module_loss_leaves_hidden_parameters_bit_identical():
    models = []
    for factor in (1.0, 1000.0):
        model = Net(loss_factor=factor)
        trainer(strategy="tpsgd", max_epochs=1, max_steps=4).fit(model, loader())
        models.append(model)
    hidden = [n for n, _ in models[0].named_parameters() if not n.startswith("net.5.")]
    assert hidden
    for name in hidden:
        assert torch.equal(models[0].get_parameter(name), models[1].get_parameter(name)), name
    assert not torch.equal(models[0].net[5].weight, models[1].net[5].weight)


def test_steps_logging_and_validation_behave_as_with_backprop():
    model = Net()
    t = trainer(strategy="tpsgd", max_epochs=2)
    t.fit(model, loader(), loader(32))
    assert t.global_step == 8  # one optimizer step per batch
    assert {"train_loss", "val_loss", "tpsgd/net.0/loss", "tpsgd/net.3/loss"} <= set(t.callback_metrics)


def test_hidden_layers_train_and_the_model_learns():
    model = Net(lr=0.05)
    before = [p.clone() for p in model.parameters()]
    trainer(strategy=TPSGDStrategy(rule="ce"), max_epochs=3).fit(model, loader())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_checkpoint_saves_projections_and_resume_continues(tmp_path):
    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    strategy = TPSGDStrategy(rule="ce", seed=5)  # fixed projections: they stay equal after resuming
    trainer(strategy=strategy, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(model, loader())
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(state["tpsgd"]["projections"]) == {"net.0", "net.3"}
    assert set(state["state_dict"]) == set(model.state_dict())  # the model's own state stays clean

    resumed_dir = tmp_path / "resumed"
    t = trainer(
        strategy=TPSGDStrategy(rule="ce", seed=5),
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=resumed_dir, save_last=True)],
    )
    t.fit(Net(), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert t.global_step == 8
    after = torch.load(resumed_dir / "last.ckpt", weights_only=False)
    for name, P in state["tpsgd"]["projections"].items():
        assert torch.equal(after["tpsgd"]["projections"][name], P)


def test_layerwise_schedule_under_the_trainer():
    model = Net()
    snapshot = {n: p.clone() for n, p in model.named_parameters()}
    strategy = TPSGDStrategy(schedule="layerwise", epochs_per_layer=1)
    t = trainer(strategy=strategy, max_epochs=3, max_steps=4)
    t.fit(model, loader())  # the first epoch = stage 0 only: block net.0 trains, nothing else moves
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed == {"net.0.weight", "net.0.bias"}
    # the first batch is traced, so its forward (and the module's own logging) runs to the end once
    assert {"tpsgd/net.0/loss", "train_loss"} <= set(t.callback_metrics)


def test_layerwise_max_epochs_too_small_fits_the_first_stages_with_a_warning():
    model = Net()
    snapshot = {n: p.clone() for n, p in model.named_parameters()}
    strategy = TPSGDStrategy(schedule="layerwise", epochs_per_layer=1)
    with pytest.warns(UserWarning) as record:
        trainer(strategy=strategy, max_epochs=1).fit(model, loader())
    messages = [str(w.message) for w in record if "layer-wise schedule" in str(w.message)]
    assert len(messages) == 1
    assert "stage 1 (hidden layer 'net.3', from epoch 1); stage 2 (output layer 'net.5', from epoch 2)" in messages[0]
    assert "will not run" in messages[0] and "Set max_epochs=3" in messages[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed == {"net.0.weight", "net.0.bias"}  # stage 0 ran; the later stages did not


def test_layerwise_full_schedule_does_not_warn(recwarn):
    trainer(strategy=TPSGDStrategy(schedule="layerwise", epochs_per_layer=1), max_epochs=3, max_steps=2).fit(
        Net(), loader()
    )
    assert not [w for w in recwarn if "layer-wise schedule" in str(w.message)]


def test_layerwise_resume_mid_schedule_is_exact(tmp_path):
    def run(stop_after=None, ckpt_path=None):
        L.seed_everything(0)
        model = Net()
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)]
        t = trainer(
            strategy=TPSGDStrategy(schedule="layerwise", epochs_per_layer=1),
            max_epochs=3,
            max_steps=stop_after or -1,
            enable_checkpointing=True,
            callbacks=callbacks,
        )
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model

    full = run()
    run(stop_after=8)  # 4 batches per epoch: stops after stage 1, in the middle of the schedule
    resumed = run(ckpt_path=tmp_path / "last.ckpt")
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


class DictData(Dataset):
    def __init__(self, key):
        self.key, self.x, self.y = key, torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"image": self.x[i], self.key: self.y[i]}


class DictNet(Net):
    def training_step(self, batch, batch_idx):
        y = batch.get("label", batch.get("target"))
        return F.cross_entropy(self(batch["image"]), y)


def test_labels_from_dict_batches_and_custom_keys():
    trainer(strategy="tpsgd", max_steps=2).fit(DictNet(), DataLoader(DictData("label"), 8))
    trainer(strategy=TPSGDStrategy(labels="target"), max_steps=2).fit(DictNet(), DataLoader(DictData("target"), 8))
    with pytest.raises(ValueError, match=r"no 'label' or 'labels'.*TPSGDStrategy\(labels='<key>'\)"):
        trainer(strategy="tpsgd", max_steps=2).fit(DictNet(), DataLoader(DictData("target"), 8))


def test_out_of_range_labels_name_the_batch_and_both_fixes():
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    y[20] = 12  # in the third batch of 8
    with pytest.raises(ValueError) as info:
        trainer(strategy="tpsgd", max_epochs=1).fit(Net(), DataLoader(TensorDataset(x, y), 8))
    message = str(info.value)
    assert "batch 2 of epoch 0 lie in [" in message and ", 12]" in message and "num_classes=10" in message
    assert "fix them in the data" in message and "TPSGDStrategy(labels=...)" in message  # the labels are wrong
    assert "13 or more classes" in message and "set num_classes to match" in message  # or the model is too small


def test_num_classes_beyond_the_output_layer_is_an_error():
    with pytest.raises(ValueError, match=r"num_classes=20 but the output layer 'net.5' \(Linear\) has 10 outputs"):
        trainer(strategy=TPSGDStrategy(num_classes=20), max_steps=1).fit(Net(), loader())


def test_progress_bar_shows_the_mean_local_loss_and_loggers_the_per_layer_ones():
    t = trainer(strategy="tpsgd", max_epochs=1)
    t.fit(Net(), loader())
    assert "tpsgd/loss" in t.progress_bar_metrics
    assert not [k for k in t.progress_bar_metrics if k.startswith("tpsgd/net.")]
    per_layer = [t.logged_metrics[k] for k in ("tpsgd/net.0/loss", "tpsgd/net.3/loss")]
    torch.testing.assert_close(t.logged_metrics["tpsgd/loss"], torch.stack(per_layer).mean())


@pytest.mark.parametrize("content", ["empty", "truncated", "text"])
def test_corrupted_checkpoint_names_the_path_and_the_fix(tmp_path, content):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(strategy="tpsgd", max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(Net(), loader())
    good = (tmp_path / "last.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "text": b"not a checkpoint\n"}[content])
    with pytest.raises(RuntimeError, match="Could not read the checkpoint") as info:
        trainer(strategy="tpsgd", max_steps=2).fit(Net(), loader(), ckpt_path=bad)
    assert str(bad) in str(info.value) and "Resume from another checkpoint" in str(info.value)


def indexed_loader(n=32, batch_size=8):
    """(x, index, y) batches whose indices also fall in [0, 10): guessing batch[1] would train on them."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % 10, y), batch_size)


class IndexedNet(Net):
    def training_step(self, batch, batch_idx):
        x, _, y = batch
        return F.cross_entropy(self(x), y)


def test_labels_of_a_batch_with_more_than_two_elements_must_be_named():
    with pytest.raises(ValueError, match=r"3 elements.*ambiguous.*TPSGDStrategy\(labels=<index>\)"):
        trainer(strategy="tpsgd", max_steps=1).fit(IndexedNet(), indexed_loader())
    model = IndexedNet()
    t = trainer(strategy=TPSGDStrategy(labels=2), max_steps=2)
    t.fit(model, indexed_loader())
    assert t.global_step == 2


class SkippingNet(Net):
    """Skips every batch whose first label is even, the Lightning way (training_step returns None)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if int(batch[1][0]) % 2 == 0 else loss


def test_a_skipped_batch_updates_nothing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    skipped = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), 8)
    model = SkippingNet()
    before = {n: p.clone() for n, p in model.named_parameters()}
    t = trainer(strategy="tpsgd", max_epochs=1)
    t.fit(model, skipped)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # a skipped batch leaves nothing behind for the next one: the trained batch matches a run without the skip
    kept = DataLoader(TensorDataset(x[8:], torch.ones(8, dtype=torch.long)), 8)
    mixed = DataLoader(TensorDataset(x, torch.tensor([0] * 8 + [1] * 8)), 8)
    reference, candidate = Net(), SkippingNet()
    trainer(strategy="tpsgd", max_epochs=1).fit(reference, kept)
    trainer(strategy="tpsgd", max_epochs=1).fit(candidate, mixed)
    for (name, a), b in zip(reference.named_parameters(), candidate.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_float_labels_are_rejected_with_the_fix():
    data = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.rand(16)), 8)

    class FloatNet(Net):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

    with pytest.raises(TypeError, match=r"integer class indices.*y.long\(\)"):
        trainer(strategy="tpsgd", max_steps=1).fit(FloatNet(), data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"devices": 2}, "trains on one device"),
    ],
)
def test_unsupported_trainer_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(strategy="tpsgd", **kwargs).fit(Net(), loader())


def test_manual_optimization_is_rejected():
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer(strategy="tpsgd").fit(Manual(), loader())


def test_gradient_clipping_applies_to_local_gradients():
    model = Net(lr=1.0)
    trainer(strategy="tpsgd", max_steps=3, gradient_clip_val=1e-6).fit(model, loader())
    reference = Net(lr=1.0)
    trainer(strategy="tpsgd", max_steps=3).fit(reference, loader())
    moved = (model.net[0].weight - Net().net[0].weight).abs().max()
    assert moved < (reference.net[0].weight - Net().net[0].weight).abs().max()


def test_bf16_mixed_precision_trains():
    model = Net()
    trainer(strategy="tpsgd", precision="bf16-mixed", max_steps=2).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_16_mixed_loss_scaling_leaves_local_updates_unchanged():
    from lightning.pytorch.plugins.precision import MixedPrecision

    models = []
    for scaled in (False, True):
        model = Net()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler)]
        trainer(strategy="tpsgd", max_steps=2, plugins=plugins).fit(model, loader())  # step 1 fits the readout
        models.append(model)
    # the local gradients were multiplied by the loss scale and divided again by the scaler's unscale
    initial = Net().net[0].weight
    updates = [m.net[0].weight - initial for m in models]
    assert updates[0].abs().max() > 1e-4
    torch.testing.assert_close(updates[1], updates[0], rtol=2e-2, atol=1e-6)


class AdamNet(Net):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_learned_projections_train_with_the_module_optimizer_and_resume_exactly(tmp_path):
    def run(stop_after=None, ckpt_path=None):
        L.seed_everything(0)
        model = AdamNet()
        t = trainer(
            strategy=TPSGDStrategy(rule="learned"),
            max_epochs=2,
            max_steps=stop_after or -1,
            enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)],
        )
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model, t

    full, t = run()
    assert len(t.optimizers[0].param_groups) == 3  # the module's parameters, then one readout per hidden block
    run(stop_after=4)  # one epoch of 4 batches
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(state["tpsgd"]["projections"]) == {"net.0", "net.3"}
    resumed, _ = run(ckpt_path=tmp_path / "last.ckpt")
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_default_rule_trains_under_a_scheduler_that_walks_every_group():
    """``rule="auto"`` adds a readout per Linear/Conv block to the optimizer after ``configure_optimizers``: the
    group copies its block's settings, ``initial_lr`` included, so ``OneCycleLR`` can step it; its learning rates
    are ``readout_lr`` times its block's ("auto": 1 for the Conv block net.0, 3 for the Linear block net.3)."""

    class OneCycleNet(AdamNet):
        def configure_optimizers(self):
            optimizer = torch.optim.Adam(
                [{"params": self.net[0].parameters(), "lr": 3e-3}, {"params": self.net[3:].parameters()}], lr=1e-2
            )
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[3e-3, 1e-2], total_steps=8)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    for readout_lr, conv, linear in (("auto", 1.0, 3.0), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5)):
        t = trainer(strategy=TPSGDStrategy(readout_lr=readout_lr), max_epochs=2)
        t.fit(OneCycleNet(), loader())
        groups = t.optimizers[0].param_groups
        assert len(groups) == 4  # the module's two groups, then the readouts of net.0 and net.3
        assert groups[2]["max_lr"] == pytest.approx(conv * 3e-3) and groups[3]["max_lr"] == pytest.approx(linear * 1e-2)
        assert groups[2]["lr"] == pytest.approx(conv * groups[0]["lr"])  # scheduled alike
        assert groups[3]["lr"] == pytest.approx(linear * groups[1]["lr"])


@pytest.mark.slow
def test_compile_option_trains_like_the_eager_strategy():
    """``compile=True`` changes how the local gradients are computed, not what they are."""
    models = []
    for compiled in (False, True):
        model = Net()
        strategy = TPSGDStrategy(rule="ce", compile=compiled)  # ce: compile fuses closed-form rules
        trainer(strategy=strategy, max_epochs=1, max_steps=3).fit(model, loader())
        models.append(model)
    for eager, fused in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


def test_a_nan_local_loss_after_the_first_step_is_reported_by_the_next_epoch():
    class Diverging(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step == 1:
                x = torch.full_like(x, float("nan"))
            return super().training_step((x, y), batch_idx)

    with pytest.raises(FloatingPointError, match="Local loss of block 'net.0' is nan"):
        trainer(strategy=TPSGDStrategy(check_every=1000), max_epochs=2).fit(Diverging(), loader())


def test_per_layer_local_losses_are_logged_when_the_loggers_write_and_at_epoch_end():
    logged = []

    class Recording(Net):
        def log(self, name, *args, **kwargs):
            if name.startswith("tpsgd/"):
                logged.append((self.trainer.global_step, name))
            return super().log(name, *args, **kwargs)

    trainer(strategy="tpsgd", max_epochs=1, log_every_n_steps=2).fit(Recording(), loader(n=80))  # 5 batches
    per_layer = sorted({step for step, name in logged if name == "tpsgd/net.0/loss"})
    assert per_layer == [1, 3, 4]  # the loggers write after steps 2 and 4 (1-based); step 5 ends the epoch
    assert sorted({step for step, name in logged if name == "tpsgd/loss"}) == [0, 1, 2, 3, 4]


def test_one_strategy_object_serves_several_trainers():
    strategy = TPSGDStrategy(rule="l2")
    reference, first, again = Net(), Net(), Net()
    trainer(strategy=TPSGDStrategy(rule="l2"), max_steps=3).fit(reference, loader())
    one = trainer(strategy=strategy, max_steps=3)
    one.fit(first, loader())
    one.validate(first, loader())  # the same Trainer runs again with what it gave the strategy
    assert one.strategy.root_device == torch.device("cpu")
    two = trainer(strategy=strategy, max_steps=3, precision="bf16-mixed")  # failed: "parallel_devices set through"
    two.fit(Net(), loader())
    assert two.strategy is strategy and two.precision == "bf16-mixed"  # the second Trainer's settings, not the first's
    trainer(strategy=strategy, max_steps=3).fit(again, loader())
    for (name, a), b, c in zip(reference.named_parameters(), first.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
        torch.testing.assert_close(c, a, msg=name)


def test_an_explicit_device_wins_and_several_devices_are_an_error():
    strategy = TPSGDStrategy(device="cpu")
    trainer(strategy=strategy, max_steps=1).fit(Net(), loader())
    assert strategy.parallel_devices == [torch.device("cpu")]
    with pytest.raises(RuntimeError, match="TPSGDStrategy has no device yet"):
        TPSGDStrategy().root_device  # noqa: B018
