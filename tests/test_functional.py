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
    loss, grad = grad_fn(h.detach(), t.clone())
    torch.testing.assert_close(loss, expected_loss.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_grad_functions_overwrite_the_target_buffer_in_place():
    h, t = torch.randn(4, 6), torch.randn(4, 6)
    _, grad = TF.tpsgd_l2_grad_(h, t)
    assert grad.data_ptr() == t.data_ptr()


def test_project_targets_is_onehot_matmul():
    P = torch.randn(5, 3, 4)
    y = torch.tensor([4, 0, 2, 2])
    expected = (TF.one_hot(y, 5) @ P.reshape(5, -1)).reshape(4, 3, 4)
    torch.testing.assert_close(TF.project_targets(y, P), expected)
