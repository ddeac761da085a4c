"""The compiled MSDA kernel is a PyTorch custom op, so torch.compile traces through it without a break."""
import pytest
import torch

import dino_core
from dino_core.ops import get_implementation

pytestmark = pytest.mark.skipif("cpu" not in dino_core.available_implementations(),
                                reason="CPU kernel (dino_core._C) not built")


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes, starts = torch.tensor([[6, 8], [3, 4]]), torch.tensor([0, 48])
    value = torch.randn(2, 60, 4, 8, generator=g, dtype=dtype)
    locations = torch.rand(2, 5, 4, 2, 3, 2, generator=g, dtype=dtype) * 1.2 - 0.1  # some outside: zeros
    weights = torch.rand(2, 5, 4, 2, 3, generator=g, dtype=dtype).softmax(-1)
    return value, shapes, starts, locations, weights


def test_kernel_op_passes_opcheck_and_gradcheck():
    value, shapes, starts, locations, weights = _inputs()
    checks = torch.library.opcheck(torch.ops.dino_core.ms_deform_attn.default, (value, shapes, starts, locations, weights))
    assert set(checks.values()) == {"SUCCESS"}, checks
    args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(get_implementation("cpu"), args)


def test_transformer_layers_compile_in_one_graph_each():
    """dino_tiny's encoder and decoder layers under torch.compile(fullgraph=True) equal eager, grads too."""
    torch.manual_seed(0)
    model, criterion, _ = dino_core.build_model("dino_tiny", num_classes=91)
    model.train()
    images, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    targets = [{"labels": torch.tensor([3, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
               {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]])}]

    def step():
        model.zero_grad(set_to_none=True)
        outputs = model(images, mask, targets, dn_generator=torch.Generator().manual_seed(1))
        loss = criterion.total_loss(criterion(outputs, targets))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step()
    assert dino_core.compile_transformer_layers(model, backend="aot_eager", fullgraph=True) == 5
    compiled_loss, compiled_grads = step()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
