"""lightning_tpsgd.engine.graphs: the CUDA-graph step."""

import pytest
import torch
from _nets import batch, cnn, mlp

from lightning_tpsgd import LocalLearner


def test_cuda_graph_needs_cuda_tensors_and_a_capturable_optimizer():
    with pytest.raises(ValueError, match="capturable=True"):
        LocalLearner(mlp(), cuda_graph=True, optimizer=lambda p: torch.optim.Adam(p, capturable=False)).step(*batch())
    with pytest.raises(ValueError, match="cuda_graph=True captures the step on a CUDA device"):
        LocalLearner(mlp(), cuda_graph=True).step(*batch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_steps():
    x, y = (t.cuda() for t in batch(n=16))
    params = []
    for graphed in (False, True):
        model = cnn().cuda()
        learner = LocalLearner(model, cuda_graph=graphed, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        for _ in range(6):  # three warm-up steps, the capture, two replays
            logs = learner.step(x, y)
        params.append([p.detach().clone() for p in model.parameters()])
        assert set(logs) == {"0", "4", "loss"}
    for eager, replayed in zip(*params, strict=True):
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-5)
