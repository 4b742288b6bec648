import pytest
import torch
import torch.nn.functional as F

from lightning_tpsgd import functional as TF
from lightning_tpsgd.rules import DRTP, TPSGDCE, CallableRule, LearnedCE, LocalRule, create_rule, list_rules

FUNCTIONAL = {"l1": TF.tpsgd_l1, "l2": TF.tpsgd_l2, "drtp": TF.drtp}


def test_registry_lists_the_rules():
    assert list_rules() == ["ce", "drtp", "drtp_sum", "l1", "l2", "learned"]
    assert list_rules("l?") == ["l1", "l2"]


@pytest.mark.parametrize("name", ["ce", "drtp", "l1", "l2"])
def test_rule_class_matches_functional(name):
    rule = create_rule(name)
    h, y, P = torch.randn(3, 5), torch.tensor([0, 3, 3]), torch.randn(4, 5)
    expected = TF.tpsgd_ce(h, y, P) if name == "ce" else FUNCTIONAL[name](h, P[y])
    torch.testing.assert_close(rule.projected_loss(h, y, P), expected)
    loss, grad, _ = rule.projected_loss_and_grad(h, y, P)
    torch.testing.assert_close(loss, expected)
    assert grad.shape == h.shape and rule.closed_form
    if name != "ce":
        torch.testing.assert_close(rule.loss(h, P[y]), expected)


def test_ce_rule_needs_all_class_targets():
    with pytest.raises(TypeError, match="needs the labels and the projection"):
        create_rule("ce").loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="kappa must be positive"):
        TPSGDCE(kappa=0)


def test_learned_rule_is_a_linear_readout_starting_at_zero_or_from_the_projection():
    rule = create_rule("learned")
    assert isinstance(rule, LearnedCE) and rule.learns_projection and not rule.closed_form
    h, y, W = torch.randn(3, 2, 4, 4), torch.tensor([0, 3, 3]), torch.randn(5, 2, 4, 4)
    expected = F.cross_entropy(h.flatten(1) @ W.flatten(1).T, y)
    torch.testing.assert_close(rule.projected_loss(h, y, W), expected)
    torch.testing.assert_close(TF.readout_ce(h, y, W), expected)
    P = torch.full((5, 2, 4, 4), 2.0)
    assert rule.init == "zeros" and torch.equal(rule.init_projection(P), torch.zeros_like(P))
    projected = LearnedCE(init="projection")
    torch.testing.assert_close(projected.init_projection(P), P / 32**0.5)  # logits of unit scale for unit-RMS h
    with pytest.raises(ValueError, match="choose 'zeros' or 'projection'"):
        LearnedCE(init="normal")
    assert all(not r.learns_projection for r in map(create_rule, ["ce", "l1", "l2", "drtp"]))
    with pytest.raises(TypeError, match="needs the labels and the readout"):
        rule.loss(h, W[y])


@pytest.mark.parametrize("name", ["l1", "l2", "drtp"])
def test_table1_update_of_a_sigmoid_unit(name):
    """One SGD step on w for y = sigmoid(x w) equals the update written in the paper's Table 1."""
    x = torch.tensor([[0.5, -1.0]])
    w = torch.tensor([[0.2], [0.4]], requires_grad=True)
    t = torch.tensor([[0.9]])  # B_i y*
    z = x @ w
    y = torch.sigmoid(z)
    (grad_w,) = torch.autograd.grad(create_rule(name).loss(y, t), w)
    dsig = (y * (1 - y)).detach()
    error = {"l2": 2 * (t - y.detach()), "l1": torch.sign(t - y.detach()), "drtp": t}[name]
    expected_update = x.T @ (error * dsig)  # Table 1: w + eta * e ⊙ sigma'(z) x, constants folded into eta
    torch.testing.assert_close(-grad_w, expected_update)


def test_callable_rule_wraps_any_loss():
    rule = create_rule(F.smooth_l1_loss)
    assert isinstance(rule, CallableRule) and not rule.closed_form
    h, t = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(rule.loss(h, t), F.smooth_l1_loss(h, t))
    with pytest.raises(NotImplementedError, match="closed-form"):
        rule.loss_and_grad_(h, t)


def test_rule_instances_pass_through():
    rule = create_rule("l2")
    assert create_rule(rule) is rule
    assert isinstance(rule, LocalRule)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("l3", ValueError, "Unknown rule 'l3'. Valid names: ce, drtp, drtp_sum, l1, l2, learned"),
        (3, TypeError, "rule must be a name"),
    ],
)
def test_bad_rules(spec, error, match):
    with pytest.raises(error, match=match):
        create_rule(spec)


class _ReferenceDRTP(torch.autograd.Function):
    """The DRTP reference code's hook (Frenkel et al. 2021): the output gradient is replaced by ``y_onehot @ B``."""

    @staticmethod
    def forward(ctx, h, y_onehot, B):
        ctx.save_for_backward(y_onehot, B)
        return h.clone()

    @staticmethod
    def backward(ctx, grad_output):
        y_onehot, B = ctx.saved_tensors
        return y_onehot @ B, None, None


@pytest.mark.parametrize("rule", ["drtp_sum", DRTP(reduction="sum")], ids=["name", "object"])
def test_drtp_sum_reproduces_the_reference_update_on_one_batch(rule):
    from lightning_tpsgd import LocalLearner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Sigmoid(), torch.nn.Linear(32, 5))
    x, y = torch.randn(16, 12, dtype=torch.float64), torch.randint(0, 5, (16,))
    model = model.double()
    learner = LocalLearner(model, rule=rule, target_scale=1.0)
    with learner.local_training(y):
        model(x)
    learner.commit_grads()  # the local gradients, as the optimizer gets them
    got = [p.grad.clone() for p in model[0].parameters()]
    model.zero_grad(set_to_none=True)
    P = learner.hidden[0].projection.P
    # the reference: dW = (e_y B ⊙ f'(z))^T x summed over the batch, its update W -= lr dW
    reference = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Sigmoid()).double()
    reference.load_state_dict(model[:2].state_dict())
    B = -P  # the reference descends along +y B, this library along -y P: the same rule with B = -P
    _ReferenceDRTP.apply(reference(x), F.one_hot(y, 5).double(), B).sum().backward()
    for g, p in zip(got, reference[0].parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
    # the default (mean) is the same update divided by the block output's N = batch x features
    mean = LocalLearner(model, rule="drtp")
    with mean.local_training(y):
        model(x)
    mean.commit_grads()
    for g, p in zip([q.grad for q in model[0].parameters()], reference[0].parameters(), strict=True):
        torch.testing.assert_close(g * (16 * 32), p.grad, rtol=1e-10, atol=1e-12)


def test_drtp_reduction_is_validated():
    with pytest.raises(ValueError, match="Invalid reduction 'max' for DRTP"):
        DRTP(reduction="max")
    assert create_rule("drtp_sum").reduction == "sum" and create_rule("drtp").reduction == "mean"
