"""A prompted model in the training / evaluation pipelines people run around it.

Each test is one pipeline that went wrong while the model path kept state between and across forwards (block 0
computing every layer's prompt K/V for the later blocks, prompt K/V cached in eval and re-validated through
parameter version counters, per-layer matching terms kept on the modules). Results are compared, in fp64, with the
independent reference (``reference/``) or with a freshly built model holding the same parameters, never with the
code under test's own earlier output.
"""

import threading

import pytest
import torch
import torch.nn.functional as F

import tcpa_kernels as tk
from reference.matching import match_prompts_ref
from reference.vit import tcpa_vit_forward_ref
from tests.test_vit import REF_KW, TCPA_KW, images, layer_params, small_vit

VALUE_TOL = dict(atol=1e-10, rtol=1e-9)
GRAD_TOL = dict(atol=1e-9, rtol=1e-7)


def tcpa_model(depth=2, dtype=torch.float64, **kw):
    """A TCPA-patched small timm ViT; the same arguments give the same parameters (seeded)."""
    return tk.apply_tcpa(small_vit(depth=depth).to(dtype), backend="torch", num_classes=7, **(TCPA_KW | kw))


def fresh_copy(model, depth=2, **kw):
    """An independently built model with the parameters ``model`` has now (nothing carried over but the values)."""
    fresh = tcpa_model(depth=depth, dtype=model.head.weight.dtype, **kw)
    fresh.load_state_dict(model.state_dict())
    return fresh


def reference(model, x):
    """fp64 reference (logits, matching loss summed over layers) with the model's current parameters (eval)."""
    return tcpa_vit_forward_ref(model, x, layer_params(model), **REF_KW)


def embed(model, x):
    """The tokens the first block sees, as timm's forward_features computes them."""
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def labels(B=2, seed=0):
    return torch.randint(0, 7, (B,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ Lightning


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_validate_then_fit_then_test(tmp_path):
    """Lightning: a baseline ``trainer.validate``, then ``trainer.fit`` (a validation loop every epoch), then
    ``trainer.test``. Lightning evaluates under ``torch.inference_mode``; tensors the model kept from that forward
    made the first training step raise "Inference tensors cannot be saved for backward"."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(images(B=8, seed=3), labels(B=8, seed=4))

    class PromptTuning(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def loss(self, batch):
            x, y = batch
            return F.cross_entropy(self.model(x), y) + 0.01 * tk.get_matching_loss(self.model)

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.loss(batch))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.loss(batch))

        def configure_optimizers(self):  # no weight decay: a parameter changes only if it gets gradients
            return torch.optim.AdamW(tk.trainable_parameters(self.model), lr=0.05, weight_decay=0.0)

        def train_dataloader(self):
            return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))

        def val_dataloader(self):
            return DataLoader(data, batch_size=4)

        def test_dataloader(self):
            return DataLoader(data, batch_size=4)

    module = PromptTuning(tcpa_model(dtype=torch.float32))
    before = [p.detach().clone() for p in tk.trainable_parameters(module.model)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, limit_val_batches=2,
                        limit_test_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path)
    (validated,) = trainer.validate(module)
    trainer.fit(module)
    fit_metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    (tested,) = trainer.test(module)

    after = tk.trainable_parameters(module.model)
    assert trainer.global_step == 4
    assert all(not torch.equal(a, b) for a, b in zip(after, before)), "fit did not change every trainable tensor"
    assert {"val_loss", "train_loss"} <= fit_metrics.keys()
    for name, value in {**validated, **fit_metrics, **tested}.items():
        assert torch.isfinite(torch.tensor(value)), f"{name} = {value}"
    # the test loop's loss is the loss of a freshly built model with the trained parameters
    fresh = fresh_copy(module.model).eval()
    with torch.no_grad():
        losses = []
        for x, y in DataLoader(data, batch_size=4):
            losses.append(F.cross_entropy(fresh(x), y) + 0.01 * tk.get_matching_loss(fresh))
    assert tested["test_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------- stale prompt K/V in eval


def assert_logits_of_a_fresh_model(model, x, when):
    model.eval()
    with torch.no_grad():
        got = model(x)
        expected = fresh_copy(model).eval()(x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12,
                               msg=lambda m: f"eval logits {when} differ from a fresh model's: {m}")


@pytest.mark.parametrize("update", ["fused_adamw", "edit_through_data"])
def test_fused_adamw_validation_equals_a_fresh_model(update):
    """Train + validate after every step with ``torch.optim.AdamW(fused=True)``, or edit a prompt through
    ``.data`` (a hand-made re-initialisation) after a validation. Neither moves a parameter's version counter, so
    every later ``eval()`` + ``no_grad`` forward reused the prompt K/V cached by an earlier one: validation saw
    stale prompts."""
    model = tcpa_model()
    params = tk.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=0.05, fused=update == "fused_adamw")
    x, y = images(B=4, seed=5).double(), labels(B=4)
    for step in range(3):
        model.train()
        loss = F.cross_entropy(model(x), y) + 0.01 * tk.get_matching_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert_logits_of_a_fresh_model(model, x, f"after {update} step {step}")
        if update == "edit_through_data":
            model.blocks[step % 2].tcpa.prompts_img.data.uniform_(-1.0, 1.0)
            assert_logits_of_a_fresh_model(model, x, f"after an edit through .data at step {step}")


# -------------------------------------------------------------------------------------- after inference_mode


def test_inference_mode_then_train_step():
    """An evaluation under ``torch.inference_mode()`` (Lightning's validate/test/predict, many eval scripts), then a
    training step: tensors kept from the inference forward (folded K/V weights, prompt K/V) are inference tensors,
    and the training forward raised "Inference tensors cannot be saved for backward"."""
    model = tcpa_model(prompt_dropout=0.0).eval()
    x = images().double()
    with torch.inference_mode():
        model(x)
    model.train()
    logits = model(x)
    match = tk.get_matching_loss(model)
    params = tk.trainable_parameters(model)
    grads = torch.autograd.grad(logits.square().sum() + match, params)
    ref_logits, ref_match = reference(model, x)
    ref_grads = torch.autograd.grad(ref_logits.square().sum() + ref_match, params, allow_unused=True)
    torch.testing.assert_close(logits, ref_logits, **VALUE_TOL)
    torch.testing.assert_close(match, ref_match, **VALUE_TOL)
    for p, g, rg in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(p) if rg is None else rg, **GRAD_TOL)


@pytest.mark.parametrize("frozen", ["backbone", "everything"])
def test_inference_mode_then_input_gradient(frozen):
    """An inference-mode evaluation, then gradients with respect to the input (saliency maps, adversarial
    examples) through the frozen model: the kept inference tensors made the backward-saving forward raise
    "Inference tensors cannot be saved for backward". ``everything``: the prompts and head frozen too."""
    model = tcpa_model().eval()
    x = images().double()
    with torch.inference_mode():
        model(x)
    if frozen == "everything":
        for p in tk.trainable_parameters(model):
            p.requires_grad_(False)
    xg = x.clone().requires_grad_()
    logits = model(xg)
    (grad,) = torch.autograd.grad(logits.sum(), xg)
    xr = x.clone().requires_grad_()
    ref_logits, _ = reference(model, xr)
    (ref_grad,) = torch.autograd.grad(ref_logits.sum(), xr)
    torch.testing.assert_close(logits, ref_logits, **VALUE_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


# ------------------------------------------------------------------------------------ gradient checkpointing

CHECKPOINT_METHODS = {
    "tcpa": lambda model: tk.apply_tcpa(model, backend="torch", prompt_dropout=0.5, **TCPA_KW),
    "vpt_shallow": lambda model: tk.apply_vpt(model, num_prompts=3, deep=False, prompt_dropout=0.5),
}


@pytest.mark.parametrize("method", CHECKPOINT_METHODS)
def test_checkpointing_two_forwards_one_backward_equals_no_checkpointing(method):
    """``set_grad_checkpointing(True)`` with two forwards before one backward (two augmented views, R-Drop,
    consistency losses), prompt dropout on: the recomputed blocks of the first forward used what the second forward
    left on the model (TCPA: its prompt K/V, another dropout mask; VPT-shallow: its carried prompts), so the
    gradients differed from the same model without checkpointing."""
    x1, x2 = images(seed=1).double(), images(seed=2).double()
    grads = []
    for checkpointing in (False, True):
        model = CHECKPOINT_METHODS[method](small_vit(depth=3).double()).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)  # the same dropout masks with and without checkpointing
        loss = model(x1).square().sum() + tk.get_matching_loss(model)  # each forward's matching loss, read at once
        loss = loss + model(x2).square().sum() + tk.get_matching_loss(model)
        params = tk.trainable_parameters(model)
        grads.append(dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                              torch.autograd.grad(loss, params))))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], **GRAD_TOL,
                                   msg=lambda m, n=name: f"{n} with checkpointing: {m}")


# --------------------------------------------------------------------------------------------- staged models


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_blocks_run_without_block_0_get_prompt_gradients(mode):
    """A staged model: the first block(s) run once under ``no_grad`` (features cached / precomputed), the later
    blocks, norm and head run with autograd. The later blocks took their prompt K/V from what block 0 computed
    without autograd, so their prompts got no gradient."""
    model = tcpa_model(depth=3, prompt_dropout=0.0).train(mode == "train")
    x = images().double()
    with torch.no_grad():
        h = model.blocks[:1](embed(model, x))
    for blk in model.blocks[1:]:
        h = blk(h)
    logits = model.forward_head(model.norm(h))
    later = {f"blocks.{i}.tcpa.{name}": getattr(model.blocks[i].tcpa, name)
             for i in range(1, 3) for name in ("prompts_cls", "prompts_img")}
    later |= {f"head.{n}": p for n, p in model.head.named_parameters()}
    grads = torch.autograd.grad(logits.square().sum(), list(later.values()), allow_unused=True)
    ref_logits, _ = reference(model, x)  # the full forward: same first-block output, same later blocks
    ref_grads = torch.autograd.grad(ref_logits.square().sum(), list(later.values()))
    torch.testing.assert_close(logits, ref_logits, **VALUE_TOL)
    for name, g, rg in zip(later, grads, ref_grads):
        assert g is not None, f"{name}: no gradient"
        assert rg.abs().sum() > 0, name
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_matching_loss_after_a_truncated_forward():
    """``forward_intermediates(x, indices=[0], stop_early=True)`` (timm feature extraction) runs block 0 only;
    ``get_matching_loss`` then added the terms the later layers had kept from an earlier full forward. Defined:
    after a forward that ran only some blocks, it is the sum over the layers that ran in that forward."""
    model = tcpa_model(depth=3).eval()
    x = images().double()
    (model(x).square().sum() + tk.get_matching_loss(model)).backward()  # a full training step before
    model.forward_intermediates(x, indices=[0], stop_early=True)  # block 0 only
    loss = tk.get_matching_loss(model)
    keys = [model.blocks[0].tcpa.keys_cls, model.blocks[0].tcpa.keys_img]
    _, expected = match_prompts_ref(embed(model, x), *keys, topk_cls=REF_KW["topk_cls"], topk_img=REF_KW["topk_img"],
                                    prompt_len_cls=REF_KW["prompt_len_cls"], prompt_len_img=REF_KW["prompt_len_img"],
                                    num_prefix_tokens=model.num_prefix_tokens)
    torch.testing.assert_close(loss, expected, **VALUE_TOL, msg=lambda m: f"matching loss of layer 0 only: {m}")
    grads = torch.autograd.grad(loss, keys)
    for g, rg in zip(grads, torch.autograd.grad(expected, keys)):
        torch.testing.assert_close(g, rg, **GRAD_TOL)


# ---------------------------------------------------------------------------------------------------- threads


def test_two_threads_share_one_model():
    """Two threads sharing one model (a serving process, a data-parallel-by-threads loop), each forward +
    ``get_matching_loss`` + backward on its own input: the matching terms lived on the shared modules, so a thread
    read (and backpropagated through) the other thread's matching loss."""
    model = tcpa_model().eval()
    params = tk.trainable_parameters(model)
    inputs = [images(seed=20).double(), images(seed=21).double()]
    expected = []
    for x in inputs:
        ref_logits, ref_match = reference(model, x)
        ref_grads = torch.autograd.grad(ref_logits.square().sum() + ref_match, params, allow_unused=True)
        expected.append((ref_logits.detach(), ref_match.detach(),
                         [torch.zeros_like(p) if g is None else g for p, g in zip(params, ref_grads)]))
    barrier = threading.Barrier(2, timeout=60)
    errors = []

    def worker(i):
        try:
            for step in range(4):
                barrier.wait()  # both forwards at once ...
                logits = model(inputs[i])
                barrier.wait()  # ... and both done before either reads its matching loss
                match = tk.get_matching_loss(model)
                ref_logits, ref_match, ref_grads = expected[i]
                where = f"thread {i}, step {step}"
                torch.testing.assert_close(logits, ref_logits, **VALUE_TOL,
                                           msg=lambda m, w=where: f"{w} logits: {m}")
                torch.testing.assert_close(match, ref_match, **VALUE_TOL,
                                           msg=lambda m, w=where: f"{w} matching loss: {m}")
                grads = torch.autograd.grad(logits.square().sum() + match, params)
                for g, rg in zip(grads, ref_grads):
                    torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, w=where: f"{w} gradient: {m}")
        except BaseException as error:  # noqa: B036 - handed to the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
