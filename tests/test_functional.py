import pytest
import torch

from lightning_tpsgd import functional as TF

CLOSED_FORMS = [(TF.tpsgd_l2, TF.tpsgd_l2_grad_), (TF.tpsgd_l1, TF.tpsgd_l1_grad_), (TF.drtp, TF.drtp_grad_)]


@pytest.mark.parametrize(("loss_fn", "grad_fn"), CLOSED_FORMS, ids=["l2", "l1", "drtp"])
@pytest.mark.parametrize("shape", [(4, 7), (3, 2, 5, 5)])
def test_closed_form_gradient_matches_autograd(loss_fn, grad_fn, shape):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    expected_loss = loss_fn(h, t)
    (expected_grad,) = torch.autograd.grad(expected_loss, h)
    loss, g, c = grad_fn(h.detach(), t.clone())
    torch.testing.assert_close(loss, expected_loss.detach())
    torch.testing.assert_close(c * g, expected_grad)


def test_grad_functions_overwrite_the_target_buffer_in_place():
    h, t = torch.randn(4, 6), torch.randn(4, 6)
    _, grad, _ = TF.tpsgd_l2_grad_(h, t)
    assert grad.data_ptr() == t.data_ptr()


def test_project_targets_is_onehot_matmul():
    P = torch.randn(5, 3, 4)
    y = torch.tensor([4, 0, 2, 2])
    expected = (TF.one_hot(y, 5) @ P.reshape(5, -1)).reshape(4, 3, 4)
    torch.testing.assert_close(TF.project_targets(y, P), expected)


@pytest.mark.parametrize("shape", [(5, 12), (4, 3, 4, 4)])
def test_ce_closed_form_gradient_matches_autograd(shape):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    P = torch.randn((3, *shape[1:]), generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2, 0][: shape[0]])
    expected_loss = TF.tpsgd_ce(h, y, P, kappa=7.0)
    (expected_grad,) = torch.autograd.grad(expected_loss, h)
    loss, g, c = TF.tpsgd_ce_grad(h.detach(), y, P, kappa=7.0)
    torch.testing.assert_close(loss, expected_loss.detach())
    grad = c * g
    torch.testing.assert_close(grad, expected_grad)
    # scale-free: the gradient is orthogonal to each output
    torch.testing.assert_close((grad * h.detach()).flatten(1).sum(1), torch.zeros(shape[0], dtype=torch.float64))


def test_ce_closed_form_gradient_in_bfloat16_writes_into_a_bfloat16_buffer():
    # the softmax runs in float32 (as under CUDA autocast, where this out= product used to fail) and its
    # result is cast back for the product into the bfloat16 buffer
    g = torch.Generator().manual_seed(0)
    h, P, y = torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    _, expected, _ = TF.tpsgd_ce_grad(h, y, P)
    out = torch.empty(6, 16, dtype=torch.bfloat16)
    loss, grad, _ = TF.tpsgd_ce_grad(h.bfloat16(), y, P.bfloat16(), out=out)
    assert grad.dtype == torch.bfloat16 and grad.data_ptr() == out.data_ptr()
    torch.testing.assert_close(grad.float(), expected, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("shape", [(5, 12), (4, 3, 4, 4)])
def test_readout_ce_closed_form_gradients_match_autograd(shape):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn((3, *shape[1:]), generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2, 0][: shape[0]])
    expected_loss = TF.readout_ce(h, y, W)
    expected = torch.autograd.grad(expected_loss, [h, W])
    out = torch.empty(shape, dtype=torch.float64)
    loss, grad_h, grad_W = TF.readout_ce_grad(h.detach(), y, W.detach(), out=out)
    assert grad_h.data_ptr() == out.data_ptr() and grad_W.shape == W.shape
    torch.testing.assert_close(loss, expected_loss.detach())
    torch.testing.assert_close(grad_h, expected[0])
    torch.testing.assert_close(grad_W, expected[1])


def test_readout_ce_closed_form_in_bfloat16_keeps_the_readouts_dtype():
    g = torch.Generator().manual_seed(0)
    h, W, y = torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    _, expected_h, expected_W = TF.readout_ce_grad(h, y, W)
    out = torch.empty(6, 16, dtype=torch.bfloat16)
    loss, grad_h, grad_W = TF.readout_ce_grad(h.bfloat16(), y, W, out=out)  # W float32, cast for the products
    assert grad_h.dtype == torch.bfloat16 and grad_h.data_ptr() == out.data_ptr()
    assert grad_W.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(grad_h.float(), expected_h, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(grad_W, expected_W, atol=2e-2, rtol=5e-2)


def test_ce_is_small_when_outputs_point_to_their_class_target():
    P = torch.eye(3, 8)
    y = torch.tensor([0, 1, 2])
    assert TF.tpsgd_ce(5 * P[y], y, P, kappa=20.0) < 1e-6
    assert TF.tpsgd_ce(5 * P[(y + 1) % 3], y, P, kappa=20.0) > 10
