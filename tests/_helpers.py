"""Helpers shared by the model-level test files."""

import torch


def assert_prompted_matches_reference(model_loss, reference_loss, params):
    """A prompted model's (output, matching loss) against the fp64 official-style computation's: the outputs (atol
    1e-10), the matching losses and the gradient of ``output.square().sum() + matching loss`` in every parameter of
    ``params`` (atol 1e-9). A parameter neither graph uses (the CLS pool of a model without prefix tokens) counts as
    a zero gradient; at least half the parameters must have a nonzero reference gradient."""
    grads = []
    for out, match in (model_loss, reference_loss):
        grads.append(torch.autograd.grad(out.square().sum() + match, params, allow_unused=True))
    (out, match), (ref, ref_match) = model_loss, reference_loss
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(match, ref_match, atol=1e-12, rtol=1e-10)
    assert sum(int(rg is not None and rg.abs().sum() > 0) for rg in grads[1]) >= len(params) // 2
    for p, g, rg in zip(params, *grads):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if g is None else g, zero if rg is None else rg, atol=1e-9, rtol=1e-7)
