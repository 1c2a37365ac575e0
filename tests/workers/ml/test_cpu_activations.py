"""The sigmoid form of GELU's tanh approximation that compiled CPU runs use: the same function as the stock modules
(forward and gradient, to float rounding), swapped in for every one of them."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import FastGELUActivation, GELUActivation, GELUTanh, NewGELUActivation

from workers.ml.cpu_activations import SigmoidFormGelu, use_sigmoid_form_gelu


@pytest.mark.parametrize("stock", [NewGELUActivation(), GELUTanh(), FastGELUActivation()], ids=type)
def test_the_sigmoid_form_is_the_tanh_approximation_forward_and_backward(stock):
    torch.manual_seed(0)
    values = torch.cat([torch.randn(10_000) * 4, torch.linspace(-30, 30, 1001)]).double()
    ours_input, stock_input = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    ours, theirs = SigmoidFormGelu()(ours_input), stock(stock_input)
    upstream = torch.randn_like(values)
    ours.backward(upstream)
    theirs.backward(upstream)

    # FastGELU rounds √(2/π) to 0.7978845608: it differs from the others in the tenth digit.
    tolerance = 1e-9 if isinstance(stock, FastGELUActivation) else 1e-12
    assert torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance)
    assert torch.allclose(ours_input.grad, stock_input.grad, rtol=tolerance, atol=tolerance)
    # And it is not the exact (erf) GELU, which it must not replace.
    assert not torch.allclose(ours, GELUActivation()(values), rtol=1e-6, atol=1e-6)


def test_every_tanh_gelu_of_a_gpt2_is_swapped_and_nothing_else():
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=16)).eval()
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(inputs).logits

    assert use_sigmoid_form_gelu(model) == 3
    assert all(isinstance(block.mlp.act, SigmoidFormGelu) for block in model.transformer.h)
    assert use_sigmoid_form_gelu(model) == 0  # nothing left to swap
    with torch.no_grad():
        after = model(inputs).logits
    assert torch.allclose(after, before, atol=1e-5)
    assert model.state_dict().keys() == state_before.keys()  # no parameter added or lost: it saves the same
    assert model.config.activation_function == "gelu_new"
