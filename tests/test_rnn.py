"""Tests for lightning_tpsgd/nn/rnn.py: the paper's recurrent cell, its BPTT form and its local update."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tpsgd import LocalLearner
from lightning_tpsgd.nn import RNN, LocalContext
from lightning_tpsgd.rules import CallableRule, create_rule, list_rules
from zoo import SequenceClassifier, create_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LitLogger.*",
    r"ignore:.*isinstance\(treespec, LeafSpec\).*",
)

T, B, F_IN, H, C = 6, 4, 3, 5, 3


def _context(rule: str | object, labels: torch.Tensor, store: dict, dtype=torch.float64) -> LocalContext:
    """A LocalContext that records the submitted gradients and hands out seeded projections."""
    generator = torch.Generator().manual_seed(1)
    projections: dict[str, torch.Tensor] = store.setdefault("P", {})

    def projection(key, shape, kind=None, scale=None):
        if key not in projections:
            projections[key] = torch.randn((C, *shape), generator=generator, dtype=dtype)
            store.setdefault("kinds", {})[key] = kind
        return projections[key]

    def submit(grads, loss, readout_grads=None):
        store["grads"], store["loss"], store["readout_grads"] = list(grads), loss, readout_grads

    rule = create_rule(rule) if isinstance(rule, str) else rule
    return LocalContext(labels, C, rule, "rnn", projection, submit)


def _reference_forward(rnn: RNN, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written unrolled loop, time-major x (T, B, F), one step at a time."""
    act = torch.sigmoid if rnn.nonlinearity == "sigmoid" else torch.tanh
    directions = 2 if rnn.bidirectional else 1
    finals, layer_input = [], x
    for layer in range(rnn.num_layers):
        outs = []
        for d, suffix in enumerate(["", "_reverse"][:directions]):
            p = {k: getattr(rnn, f"{k}_l{layer}{suffix}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            h = h0[layer * directions + d] if h0 is not None else x.new_zeros(x.shape[1], rnn.hidden_size)
            out = [None] * x.shape[0]
            for t in reversed(range(x.shape[0])) if d else range(x.shape[0]):
                h = act(h @ p["weight_hh"].T + p["bias_hh"] + layer_input[t] @ p["weight_ih"].T + p["bias_ih"])
                out[t] = h
            outs.append(torch.stack(out))
            finals.append(h)
        layer_input = torch.cat(outs, dim=2)
    return layer_input, torch.stack(finals)


def _brute_force_grads(rnn: RNN, x: torch.Tensor, y: torch.Tensor, P: dict, rule: str, mean: bool) -> dict:
    """Eq. (4)-(5) one time step at a time, with the per-step loss gradient of the rule (single layer).

    With ``center_targets`` the targets are ``B_t`` minus its class mean and the rule sees ``h - 0.5``.
    """
    mid = 0.5 if rnn.center_targets else 0.0
    grads = {}
    for d, suffix in enumerate(["", "_reverse"][: 2 if rnn.bidirectional else 1]):
        p = {k: getattr(rnn, f"{k}_l0{suffix}").detach() for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h = x.new_zeros(x.shape[1], rnn.hidden_size)
        g = {k: torch.zeros_like(v) for k, v in p.items()}
        order = list(reversed(range(x.shape[0]))) if d else list(range(x.shape[0]))
        for s, t in enumerate(order):
            h_next = torch.sigmoid(h @ p["weight_hh"].T + p["bias_hh"] + x[t] @ p["weight_ih"].T + p["bias_ih"])
            B_s = P[f"l0{suffix}"][:, s]
            target = (B_s - B_s.mean(0) if rnn.center_targets else B_s)[y]
            n, h_rule = h_next.numel(), h_next - mid
            dloss = {"l1": torch.sign(h_rule - target) / n, "l2": 2 * (h_rule - target) / n, "drtp": -target / n}[rule]
            D = dloss * h_next * (1 - h_next)
            g["weight_ih"] += D.T @ x[t]
            g["weight_hh"] += D.T @ h
            g["bias_ih"] += D.sum(0)
            g["bias_hh"] += D.sum(0)
            h = h_next
        for k, v in g.items():
            grads[f"{k}_l0{suffix}"] = v / x.shape[0] if mean else v
    return grads


# ---------------------------------------------------------------- forward and shapes
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("nonlinearity", ["sigmoid", "tanh"])
def test_forward_matches_the_unrolled_reference(num_layers, bidirectional, nonlinearity):
    torch.manual_seed(0)
    rnn = RNN(F_IN, H, num_layers=num_layers, bidirectional=bidirectional, nonlinearity=nonlinearity)
    x = torch.randn(T, B, F_IN)
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), B, H)
    for hx in (None, h0):
        output, h_n = rnn(x, hx)
        ref_out, ref_h = _reference_forward(rnn, x, hx)
        torch.testing.assert_close(output, ref_out)
        torch.testing.assert_close(h_n, ref_h)


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "out_shape", "h_shape"),
    [
        ({}, (T, B, F_IN), (T, B, H), (1, B, H)),
        ({"batch_first": True}, (B, T, F_IN), (B, T, H), (1, B, H)),
        ({"bidirectional": True, "num_layers": 2}, (T, B, F_IN), (T, B, 2 * H), (4, B, H)),
        ({"batch_first": True, "bidirectional": True}, (B, T, F_IN), (B, T, 2 * H), (2, B, H)),
        ({"num_layers": 3}, (T, F_IN), (T, H), (3, H)),  # unbatched
    ],
)
def test_shapes_and_return_values_like_torch(kwargs, x_shape, out_shape, h_shape):
    rnn = RNN(F_IN, H, **kwargs)
    output, h_n = rnn(torch.randn(x_shape))
    assert output.shape == out_shape and h_n.shape == h_shape
    output, h_n = rnn(torch.randn(x_shape), torch.zeros(h_shape))
    assert output.shape == out_shape and h_n.shape == h_shape


@pytest.mark.parametrize("bidirectional", [False, True])
def test_return_sequences_false_gives_the_final_states(bidirectional):
    torch.manual_seed(0)
    full = RNN(F_IN, H, num_layers=2, bidirectional=bidirectional, batch_first=True)
    last = RNN(F_IN, H, num_layers=2, bidirectional=bidirectional, batch_first=True, return_sequences=False)
    last.load_state_dict(full.state_dict())
    x = torch.randn(B, T, F_IN)
    output, h_n = full(x)
    final, h_n_last = last(x)
    torch.testing.assert_close(h_n_last, h_n)
    expected = torch.cat([output[:, -1, :H], output[:, 0, H:]], dim=1) if bidirectional else output[:, -1]
    torch.testing.assert_close(final, expected)
    assert last(x[0])[0].shape == (H * (2 if bidirectional else 1),)  # unbatched


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_local_step_without_the_sequence_gives_the_same_gradients(chunk_size):
    results = []
    for return_sequences in (True, False):
        torch.manual_seed(0)
        rnn = RNN(
            F_IN,
            H,
            num_layers=2,
            bidirectional=True,
            chunk_size=chunk_size,
            return_sequences=return_sequences,
            dtype=torch.float64,
        )
        store: dict = {}
        rnn.tpsgd_context = _context("l1", torch.tensor([0, 2, 1, 2]), store)
        _, h_n = rnn(torch.randn(T, B, F_IN, dtype=torch.float64))
        results.append((store["grads"], store["loss"], h_n))
    (grads_a, loss_a, h_a), (grads_b, loss_b, h_b) = results
    torch.testing.assert_close(h_a, h_b)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


def test_tanh_model_loads_a_torch_rnn_and_matches_it():
    torch.manual_seed(0)
    ref = nn.RNN(F_IN, H, num_layers=2, bidirectional=True, batch_first=True)
    rnn = RNN(F_IN, H, num_layers=2, bidirectional=True, batch_first=True, nonlinearity="tanh")
    assert [n for n, _ in rnn.named_parameters()] == [n for n, _ in ref.named_parameters()]
    rnn.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(B, T, F_IN), torch.randn(4, B, H)
    for a, b in zip(rnn(x, h0), ref(x, h0), strict=True):
        torch.testing.assert_close(a, b)


def test_init_zeros_and_uniform_scale():
    assert all((p == 0).all() for p in RNN(F_IN, H, init="zeros").parameters())
    rnn = RNN(F_IN, H, init_scale=0.01)
    assert all(p.abs().max() <= 0.01 for p in rnn.parameters())
    torch.manual_seed(0)
    default = RNN(64, 16, num_layers=2, bidirectional=True)  # first input weights: sqrt(3/F); the rest 1/sqrt(H)
    for name, p in default.named_parameters():
        bound = math.sqrt(3 / 64) if name.startswith("weight_ih_l0") else 0.25
        assert p.abs().max() <= bound and p.abs().max() > bound / 2, name
    as_torch = RNN(64, 16, num_layers=2, input_init_scale=None)  # torch.nn.RNN's init: 1/sqrt(H) everywhere
    assert all(p.abs().max() <= 0.25 for p in as_torch.parameters())
    assert as_torch.weight_ih_l0.abs().max() > 0.2
    torch.manual_seed(0)
    split = RNN(F_IN, 64, num_layers=2, bidirectional=True, init_scale=0.01, input_init_scale=2.0, bias_init_scale=3.0)
    for name, p in split.named_parameters():
        bound = {"weight_ih": 2.0, "weight_hh": 0.01, "bias_ih": 3.0, "bias_hh": 3.0}[name.split("_l")[0]]
        assert p.abs().max() <= bound and p.abs().max() > bound / 2, name


def test_bptt_gradients_without_context():
    torch.manual_seed(0)
    rnn = RNN(F_IN, H, num_layers=2, bidirectional=True)
    output, h_n = rnn(torch.randn(T, B, F_IN))
    assert output.grad_fn is not None
    (output.sum() + h_n.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rnn.parameters())


# ---------------------------------------------------------------- the local update
@pytest.mark.parametrize("rule", ["l1", "l2", "drtp"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(("chunk_size", "center"), [(1, False), (4, False), (64, False), (4, True)])
def test_local_gradients_equal_a_per_time_step_computation(rule, bidirectional, chunk_size, center):
    torch.manual_seed(0)
    rnn = RNN(
        F_IN,
        H,
        bidirectional=bidirectional,
        chunk_size=chunk_size,
        center_targets=center,
        nonlinearity="sigmoid",  # the paper's cell, which _brute_force_grads writes out
        dtype=torch.float64,
    )
    x, y = torch.randn(T, B, F_IN, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    store: dict = {}
    rnn.tpsgd_context = _context(rule, y, store)
    output, h_n = rnn(x)
    rnn.tpsgd_context = None
    expected = _brute_force_grads(rnn, x, y, store["P"], rule, mean=False)
    names = [n for n, _ in rnn.named_parameters()]
    assert len(store["grads"]) == len(names)
    for name, grad in zip(names, store["grads"], strict=True):
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12)
    # the local forward computes the same hidden states as the ordinary one
    ref_out, ref_h = rnn(x)
    torch.testing.assert_close(output, ref_out)
    torch.testing.assert_close(h_n, ref_h)


@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (1, True), (2, False)])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_learned_readout_gradients_equal_autograd_with_time_local_states(num_layers, bidirectional, chunk_size):
    """Rule "learned": per step CE(h_{t+1} W_t^T, y) with h_t detached from step to step and between layers."""
    torch.manual_seed(0)
    rnn = RNN(F_IN, H, num_layers=num_layers, bidirectional=bidirectional, chunk_size=chunk_size, dtype=torch.float64)
    x, y = torch.randn(T, B, F_IN, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    store: dict = {}
    rnn.tpsgd_context = _context("learned", y, store)
    output, _ = rnn(x)
    rnn.tpsgd_context = None
    readouts = {k: P.clone().requires_grad_() for k, P in store["P"].items()}
    loss, layer_input = 0.0, x
    for layer in range(num_layers):
        outs = []
        for d, suffix in enumerate(["", "_reverse"][: 2 if bidirectional else 1]):
            p = {k: getattr(rnn, f"{k}_l{layer}{suffix}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            h, out = x.new_zeros(B, H), [None] * T
            for step, t in enumerate(reversed(range(T)) if d else range(T)):
                z = h.detach() @ p["weight_hh"].T + p["bias_hh"] + layer_input[t] @ p["weight_ih"].T + p["bias_ih"]
                h = out[t] = torch.tanh(z)
                loss = loss + F.cross_entropy(h @ readouts[f"l{layer}{suffix}"][:, step].T, y)
            outs.append(torch.stack(out))
        layer_input = torch.cat(outs, dim=2).detach()
    names = [n for n, _ in rnn.named_parameters()]
    expected = torch.autograd.grad(loss, [*rnn.parameters(), *readouts.values()])
    for name, grad, ref in zip(names, store["grads"], expected, strict=False):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12, msg=name)
    assert sorted(store["readout_grads"]) == sorted(readouts)
    for key, ref in zip(readouts, expected[len(names) :], strict=True):
        torch.testing.assert_close(store["readout_grads"][key], ref, rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(store["loss"], loss.detach())
    torch.testing.assert_close(output, layer_input)


@pytest.mark.parametrize("rule", list_rules())
def test_every_registered_rule_trains_the_rnn(rule):
    torch.manual_seed(0)
    rnn = RNN(F_IN, H, bidirectional=True)
    store: dict = {}
    rnn.tpsgd_context = _context(rule, torch.tensor([0, 2, 1, 2]), store, dtype=torch.float32)
    rnn(torch.randn(T, B, F_IN))
    assert len(store["grads"]) == 8 and torch.isfinite(store["loss"])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in store["grads"])


def test_mean_reduction_divides_the_sum_by_the_sequence_length():
    results = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        rnn = RNN(F_IN, H, time_reduction=reduction, dtype=torch.float64)
        store: dict = {}
        rnn.tpsgd_context = _context("l1", torch.tensor([0, 1, 2, 0]), store)
        rnn(torch.randn(T, B, F_IN, dtype=torch.float64))
        results[reduction] = store
    for g_sum, g_mean in zip(results["sum"]["grads"], results["mean"]["grads"], strict=True):
        torch.testing.assert_close(g_mean, g_sum / T)
    torch.testing.assert_close(results["mean"]["loss"], results["sum"]["loss"] / T)


@pytest.mark.parametrize("rule", ["l1", "l2", "drtp"])
@pytest.mark.parametrize("nonlinearity", ["sigmoid", "tanh"])
def test_vectorised_rules_match_the_per_step_path(rule, nonlinearity):
    """The built-in rules run over whole chunks of time steps; a subclass takes the per-step path."""
    base = type(create_rule(rule))
    per_step = type("PerStep", (base,), {})()
    results = []
    for r in (base(), per_step):
        torch.manual_seed(0)
        rnn = RNN(F_IN, H, bidirectional=True, nonlinearity=nonlinearity, chunk_size=4, dtype=torch.float64)
        store: dict = {}
        rnn.tpsgd_context = _context(r, torch.tensor([0, 1, 2, 0]), store)
        rnn(torch.randn(T, B, F_IN, dtype=torch.float64))
        results.append(store)
    (a, b) = results
    for g_a, g_b in zip(a["grads"], b["grads"], strict=True):
        torch.testing.assert_close(g_a, g_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-10, atol=1e-12)


def test_callable_rule_matches_the_closed_form():
    grads = {}
    for rule in ("l2", CallableRule(lambda h, t: (h - t).pow(2).mean())):
        torch.manual_seed(0)
        rnn = RNN(F_IN, H, bidirectional=True, chunk_size=4, dtype=torch.float64)
        store: dict = {}
        rnn.tpsgd_context = _context(rule, torch.tensor([0, 1, 2, 0]), store)
        rnn(torch.randn(T, B, F_IN, dtype=torch.float64))
        grads[str(rule)] = store
    (a, b) = grads.values()
    for g_a, g_b in zip(a["grads"], b["grads"], strict=True):
        torch.testing.assert_close(g_a, g_b)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_local_mode_keeps_no_graph():
    rnn = RNN(F_IN, H, num_layers=2, bidirectional=True)
    saved: list[torch.Tensor] = []
    store: dict = {}
    rnn.tpsgd_context = _context("l1", torch.tensor([0, 1, 2, 0]), store, dtype=torch.float32)
    x = torch.randn(T, B, F_IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output, h_n = rnn(x)
    assert output.grad_fn is None and h_n.grad_fn is None and not output.requires_grad
    assert saved == []
    assert all(g.grad_fn is None for g in store["grads"])


def _local_step_in(precision: str, grad_dtype: str | None, rule: str = "l2") -> tuple[list, torch.Tensor, torch.Tensor]:
    """One local step of a float32 stacked bidirectional RNN: (gradients, loss, output)."""
    torch.manual_seed(0)
    rnn = RNN(8, 32, num_layers=2, bidirectional=True, nonlinearity="tanh", grad_dtype=grad_dtype, chunk_size=4)
    store: dict = {}
    y = torch.arange(16) % C
    rnn.tpsgd_context = _context(rule, y, store, dtype=torch.float32)
    x = torch.randn(10, 16, 8, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        output, _ = rnn(x)
    return store["grads"], store["loss"], output


@pytest.mark.parametrize("rule", ["l1", "l2", "drtp"])
@pytest.mark.parametrize(
    ("precision", "grad_dtype"), [("bf16-mixed", None), ("bf16-mixed", "float32"), ("32", "bfloat16")]
)
def test_lower_precision_local_step_accumulates_float32_gradients(rule, precision, grad_dtype):
    # under autocast the recurrence and the products run in bfloat16 (as BPTT's would); grad_dtype lowers the
    # products alone. Either way the gradients are float32 and close to the float32 step's.
    reference, ref_loss, _ = _local_step_in("32", None, rule)
    grads, loss, output = _local_step_in(precision, grad_dtype, rule)
    assert output.dtype == (torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    assert loss.dtype == torch.float32 and torch.isclose(loss, ref_loss, rtol=0.05)
    for grad, ref in zip(grads, reference, strict=True):
        assert grad.dtype == torch.float32
        assert (grad - ref).norm() <= 0.1 * ref.norm() + 1e-6


def test_reused_work_buffers_leave_no_trace_between_steps():
    """The local step reuses its chunk buffers: a second batch gives what a fresh module gives."""
    torch.manual_seed(0)
    rnn = RNN(F_IN, H, num_layers=2, bidirectional=True, chunk_size=2, return_sequences=False, dtype=torch.float64)
    fresh = copy.deepcopy(rnn)
    x1, x2 = torch.randn(T, B, F_IN, dtype=torch.float64), torch.randn(T, B, F_IN, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    rnn.tpsgd_context = _context("l1", labels, {})
    rnn(x1)
    store, fresh_store = {}, {}
    rnn.tpsgd_context = _context("l1", labels, store)
    out, h_n = rnn(x2)
    fresh.tpsgd_context = _context("l1", labels, fresh_store)
    fresh_out, fresh_h_n = fresh(x2)
    torch.testing.assert_close(h_n, fresh_h_n)
    torch.testing.assert_close(out, fresh_out)
    for grad, fresh_grad in zip(store["grads"], fresh_store["grads"], strict=True):
        torch.testing.assert_close(grad, fresh_grad)
    ref_out, ref_h_n = _reference_forward(rnn, x2)
    torch.testing.assert_close(h_n, ref_h_n)  # both directions' final states survive the shared scratch


def test_frozen_parameters_get_no_gradient():
    rnn = RNN(F_IN, H)
    rnn.bias_ih_l0.requires_grad_(False)
    store: dict = {}
    rnn.tpsgd_context = _context("l1", torch.tensor([0, 1, 2, 0]), store, dtype=torch.float32)
    rnn(torch.randn(T, B, F_IN))
    assert [g.shape for g in store["grads"]] == [(H, F_IN), (H, H), (H,)]


@pytest.mark.parametrize(("rule", "kind"), [("l1", "binary"), ("drtp", "orthogonal"), ("l2", "uniform")])
def test_default_projection_kind_follows_the_rule(rule, kind):
    store: dict = {}
    rnn = RNN(F_IN, H)
    rnn.tpsgd_context = _context(rule, torch.tensor([0, 1, 2, 0]), store, dtype=torch.float32)
    rnn(torch.randn(T, B, F_IN))
    assert store["kinds"] == {"l0": kind}
    rnn.projection = "normal"
    store = {}
    rnn.tpsgd_context = _context(rule, torch.tensor([0, 1, 2, 0]), store, dtype=torch.float32)
    rnn(torch.randn(T, B, F_IN))
    assert store["kinds"] == {"l0": "normal"}


# ---------------------------------------------------------------- inside the engine and the strategy
def _seq_model(**kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    return create_model("rnn1", num_classes=C, input_size=F_IN, hidden_size=8, **kwargs)


def test_stacked_and_bidirectional_projections_are_saved_per_layer_and_direction():
    model = create_model("rnn2", num_classes=C, input_size=F_IN, hidden_size=8, mlp_hidden=6)
    model[0] = RNN(F_IN, 8, num_layers=2, bidirectional=True, batch_first=True)
    model[2] = nn.Linear(16, 6)
    learner = LocalLearner(model, rule="l2", overrides={"0": {"rule": "l1", "target_scale": 0.5}})
    learner.step(torch.randn(B, T, F_IN), torch.tensor([0, 1, 2, 0]))
    projections = learner.state_dict()["projections"]
    assert set(projections) == {"0:l0", "0:l0_reverse", "0:l1", "0:l1_reverse", "2"}
    assert projections["0:l0"].shape == (C, T, 8)
    assert set(projections["0:l1_reverse"].unique().tolist()) == {-0.5, 0.5}  # binary for l1, scaled
    # the projections are independent and restored from a checkpoint
    assert not torch.equal(projections["0:l0"], projections["0:l0_reverse"])
    state = learner.state_dict()
    fresh = LocalLearner(model, rule="l2", overrides={"0": {"rule": "l1", "target_scale": 0.5}})
    fresh.load_state_dict(state)
    fresh.step(torch.randn(B, T, F_IN), torch.tensor([0, 1, 2, 0]))
    for name, P in fresh.state_dict()["projections"].items():
        torch.testing.assert_close(P, projections[name])


def test_projection_override_of_the_strategy_reaches_the_rnn():
    """``overrides={"0": {"projection": ...}}`` sets the RNN's projection kind (it used to be ignored)."""
    labels = torch.tensor([0, 1, 2, 0])
    learner = LocalLearner(_seq_model(), rule="l2", overrides={"0": {"rule": "drtp", "projection": "binary"}})
    learner.step(torch.randn(B, T, F_IN), labels)
    assert set(learner.state_dict()["projections"]["0:l0"].unique().tolist()) == {-1.0, 1.0}
    model = _seq_model()
    model[0].projection = "normal"
    learner = LocalLearner(model, rule="l2", overrides={"0": {"rule": "drtp", "projection": "binary"}})
    with pytest.raises(ValueError, match="projection='normal'.*'binary'.*one place"):
        learner.step(torch.randn(B, T, F_IN), labels)
    with pytest.raises(ValueError, match="projection"):
        LocalLearner(_seq_model(), rule="l2", overrides={"0": {"projection": "bogus"}})


def test_local_step_trains_the_rnn_and_the_classifier():
    model = _seq_model()
    before = [p.detach().clone() for p in model.parameters()]
    learner = LocalLearner(model, rule="drtp", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    logs = learner.step(torch.randn(B, T, F_IN), torch.tensor([0, 1, 2, 0]))
    assert set(logs) == {"0", "loss"}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_frozen_rnn_passes_through_the_engine():
    model = _seq_model(freeze_rnn=True)
    rnn_before = [p.detach().clone() for p in model[0].parameters()]
    learner = LocalLearner(model, rule="l2")
    assert [b.name for b in learner.blocks] == ["2"]
    learner.step(torch.randn(B, T, F_IN), torch.tensor([0, 1, 2, 0]))
    assert all(torch.equal(a, b) for a, b in zip(rnn_before, model[0].parameters(), strict=True))


@pytest.mark.parametrize("name", ["rnn1", "rnn2", "birnn1"])
def test_feature_norm_standardises_the_final_state_and_passes_through_the_engine(name):
    model = create_model(name, num_classes=C, input_size=F_IN, hidden_size=H, feature_norm="batch")
    norm = model[2]
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and not list(norm.parameters())
    learner = LocalLearner(
        model,
        rule="l2",
        overrides={"0": {"rule": "drtp"}},
        schedule="layerwise",
        epochs_per_layer=1,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
    )
    assert learner.blocks[0].name == "0" and learner.blocks[1].name == "3"
    x, y = torch.randn(8, T, F_IN), torch.randint(0, C, (8,))
    for epoch in range(learner.num_stages):
        learner.set_epoch(epoch)
        learner.step(x, y)
    assert norm.num_batches_tracked > 0  # the head stages ran it in training mode
    features = model[1](model[0](x))
    torch.testing.assert_close(norm.train()(features).mean(0), torch.zeros(features.shape[1]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="feature_norm must be one of None, 'batch', got 'layer'"):
        create_model(name, feature_norm="layer")


@pytest.mark.parametrize("strategy", ["tpsgd", "auto"])
def test_sequence_classifier_trains_under_the_strategy_and_as_bptt(strategy):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, T, F_IN, generator=generator), torch.randint(0, C, (16,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = SequenceClassifier("birnn1", num_classes=C, model_kwargs={"input_size": F_IN, "hidden_size": 8})
    before = module.net[0].weight_hh_l0.detach().clone()
    trainer = L.Trainer(
        strategy=strategy,
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert not torch.equal(before, module.net[0].weight_hh_l0)
    if strategy == "tpsgd":
        assert "tpsgd/net.0/loss" in trainer.callback_metrics


def test_locally_trained_rnn_beats_a_frozen_random_rnn():
    # The class is the sign of the input at time step 1, followed by noise: the RNN must remember it.
    generator = torch.Generator().manual_seed(0)
    n, steps = 512, 8
    y = torch.randint(0, 2, (n,), generator=generator)
    x = 0.5 * torch.randn(n, steps, 1, generator=generator)
    x[:, 1, 0] = (2 * y - 1).float()
    accuracy = {}
    # the trained RNN at three projection seeds (its accuracy on this toy task varies with the projection)
    for control, seed in [(True, 0), (False, 0), (False, 1), (False, 2)]:
        torch.manual_seed(0)
        model = create_model(
            "rnn1", num_classes=2, input_size=1, hidden_size=32, nonlinearity="tanh", freeze_rnn=control
        )
        learner = LocalLearner(
            model,
            rule="l2",
            seed=seed,
            overrides=None if control else {"0": {"rule": "drtp"}},
            optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        )
        for _ in range(4):
            for i in range(0, n, 64):
                learner.step(x[i : i + 64], y[i : i + 64])
        learner.close()
        with torch.no_grad():
            accuracy[control, seed] = (model(x).argmax(1) == y).float().mean().item()
    trained = sorted(accuracy[False, seed] for seed in range(3))[1]  # the median
    assert trained > 0.85 and trained > accuracy[True, 0] + 0.15, accuracy


# ---------------------------------------------------------------- errors
BAD_OPTIONS = [
    (dict(nonlinearity="relu"), ValueError, r"Invalid nonlinearity 'relu'; choose one of 'sigmoid', 'tanh'"),
    (dict(time_reduction="max"), ValueError, r"Invalid time_reduction 'max'"),
    (dict(init="normal"), ValueError, r"Invalid init 'normal'"),
    (dict(projection="filter"), ValueError, r"Invalid projection 'filter'"),
    (dict(num_layers=0), ValueError, r"num_layers must be a positive int, got 0"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
    (dict(init_scale=-1.0), ValueError, r"init_scale must be a finite number >= 0"),
    (dict(input_init_scale=float("nan")), ValueError, r"input_init_scale must be a finite number >= 0"),
    (dict(input_init_scale="lecun"), ValueError, r"input_init_scale must be a number, 'fan_in' or None"),
    (dict(bias_init_scale=-0.5), ValueError, r"bias_init_scale must be a finite number >= 0"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_OPTIONS)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        RNN(F_IN, H, **kwargs)


def test_bad_inputs_name_the_fix():
    rnn = RNN(F_IN, H, batch_first=True)
    with pytest.raises(ValueError, match=r"got inputs with 7 features .* Set input_size=7"):
        rnn(torch.randn(B, T, 7))
    with pytest.raises(ValueError, match=r"3-D batched input \(B, T, F\)"):
        rnn(torch.randn(B, T, F_IN, 1))
    with pytest.raises(ValueError, match=r"expects hx of shape \(1, 4, 5\), got \(2, 4, 5\)"):
        rnn(torch.randn(B, T, F_IN), torch.zeros(2, B, H))
    rnn.tpsgd_context = _context("l1", torch.tensor([0, 1]), {}, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"batch of 4 sequences but \(2,\) labels"):
        rnn(torch.randn(B, T, F_IN))


def test_torch_recurrent_layers_are_rejected_with_a_pointer_to_ours():
    for layer in (nn.RNN(F_IN, H), nn.GRU(F_IN, H), nn.LSTM(F_IN, H)):
        with pytest.raises(TypeError, match="Use lightning_tpsgd.nn.RNN"):
            LocalLearner(nn.Sequential(layer, nn.Linear(H, C)))


def test_the_default_cell_is_tanh_like_torch_nn_rnn():
    assert RNN(F_IN, H).nonlinearity == "tanh" == nn.RNN(F_IN, H).nonlinearity


def test_learned_readouts_train_with_the_optimizer_and_round_trip_through_the_state_dict():
    """The RNN's default rule ("learned"): one readout per layer and direction, trained, checkpointed, restored."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = RNN(4, 6, bidirectional=True, batch_first=True), nn.Linear(12, 3)

        def forward(self, x):
            return self.head(torch.cat(list(self.rnn(x)[1]), dim=1))

    torch.manual_seed(0)
    x, y = torch.randn(8, 5, 4), torch.randint(0, 3, (8,))
    learner = LocalLearner(Recurrent())
    learner.step(x, y)
    readouts = learner.learned_projections()
    assert [tuple(P.shape) for P in readouts] == [(3, 5, 6), (3, 5, 6)]
    before = [P.detach().clone() for P in readouts]
    learner.step(x, y)
    assert all(not torch.equal(a, P) for a, P in zip(before, readouts, strict=True))  # trained
    state = copy.deepcopy(learner.state_dict())
    assert sorted(state["projections"]) == ["rnn:l0", "rnn:l0_reverse"]
    restored = LocalLearner(copy.deepcopy(learner.model))
    restored.step(x, y)  # traced: the readouts exist, then the checkpoint replaces them and the optimizer state
    restored.load_state_dict(state)
    for a, b in zip(restored.learned_projections(), readouts, strict=True):
        torch.testing.assert_close(a, b)
