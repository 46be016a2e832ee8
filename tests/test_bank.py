"""PromptBank: TCPA tasks side by side on one backbone, a task per sample. Each sample's logits, and in training
every task's gradients, equal those of the backbone loaded with that task alone (fp64 on the torch backend, fp32 in
the Triton interpreter), for mixed, sorted and single-task batches; tasks save back to folders that load alone; the
forward makes no per-sample copy of the prompt keys/values."""

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tcpa_kernels as tk
from tcpa_kernels.checkpoint import read_checkpoint, write_folder
from tests._helpers import TIMM_FAMILIES
from tests._philox import philox_multipliers, recorded_seeds

POOLS = dict(pool_size_cls=3, pool_size_img=4, topk_cls=2, topk_img=2, prompt_len_cls=2, prompt_len_img=1,
             prompt_dropout=0.0)
CLASSES = {"shirts": 3, "shoes": 5, "bags": 4}
ORDERS = {"mixed": ["bags", "shirts", "bags", "shoes", "shirts"],
          "sorted": ["shirts", "shirts", "shoes", "bags", "bags"], "single": ["shoes"] * 5,
          "two_of_three": ["bags", "shirts", "bags", "shirts", "bags"]}  # the prompt K/V of the batch's tasks only
DTYPES = {"torch": torch.float64, "triton": torch.float32}
# the tasks' own pools: "shared" all POOLS; "different" pool sizes, top-k and prompt lengths per task (padded to
# 4 entries of 3 tokens + 6 entries of 2 in the bank)
LAYOUTS = {"shared": None,
           "different": {"shirts": dict(pool_size_cls=2, topk_cls=1, pool_size_img=6, topk_img=3, prompt_len_cls=3),
                         "shoes": dict(pool_size_cls=4, topk_cls=3, pool_size_img=3, topk_img=1, prompt_len_cls=1,
                                       prompt_len_img=2)}}


def tiny_vit(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=6)
    return model.to(dtype).eval()


@pytest.fixture
def task_folders(tmp_path):
    return save_tasks(tmp_path, POOLS)


def save_tasks(folder, pools, backbone=tiny_vit, options=None):
    """An adapter folder per task: the same backbone (``backbone()``), each task's own prompts, keys and head (moved
    off their initial values; ``pools`` with ``num_classes=None``: the backbone's head, or none); ``options``: task
    name -> more ``apply_tcpa`` arguments of that task."""
    folders = {}
    for seed, (name, classes) in enumerate(CLASSES.items()):
        kwargs = {"backend": "torch", "num_classes": classes} | pools | (options or {}).get(name, {})
        model = tk.apply_tcpa(backbone(), **kwargs)
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for p in tk.trainable_parameters(model):
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        folders[name] = folder / name
        tk.save_pretrained(model, folders[name])
    return folders


def images(B=5, dtype=torch.float32):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


def alone(folder, backend, dtype):
    """The backbone with one task loaded, as ``from_pretrained`` makes it."""
    model = tk.from_pretrained(tiny_vit(dtype), folder)
    for blk in model.blocks:
        blk.tcpa.config.backend = backend
    return model


def bank_of(task_folders, backend, dtype):
    return tk.PromptBank(tiny_vit(dtype), task_folders, backend=backend)


def own_rows(bank, t):
    """bool [P]: task t's rows of the bank's padded prompt rows (its first entries' first tokens in each pool; the
    CLS pool's rows first), in its model's order (``prompts_cls.flatten(0, 1)``, then ``prompts_img``'s)."""
    config = bank.model.prompt_state.config  # the padded pools
    own_cls, own_img, _, _, own_len_cls, own_len_img = bank.layouts[t]
    cls = torch.zeros(config.pool_size_cls, config.prompt_len_cls, dtype=torch.bool)
    img = torch.zeros(config.pool_size_img, config.prompt_len_img, dtype=torch.bool)
    cls[:own_cls, :own_len_cls] = img[:own_img, :own_len_img] = True
    return torch.cat([cls.flatten(), img.flatten()])


@pytest.mark.parametrize("backend, order, layouts", [("torch", "mixed", "shared"), ("torch", "sorted", "shared"),
                                                     ("torch", "single", "shared"), ("triton", "mixed", "shared"),
                                                     ("torch", "mixed", "different"), ("torch", "single", "different"),
                                                     ("triton", "two_of_three", "different")])
def test_logits_equal_each_task_alone(tmp_path, backend, order, layouts):
    """Each sample's logits are its task's model alone; with tasks of different pool sizes and top-k too (task names
    here; task numbers: ``test_task_numbers_with_different_pools``)."""
    dtype, task_folders = DTYPES[backend], save_tasks(tmp_path, POOLS, options=LAYOUTS[layouts])
    bank, x, tasks = bank_of(task_folders, backend, dtype), images(dtype=dtype), ORDERS[order]
    with torch.no_grad():
        out = bank(x, tasks)
    assert out.logits.shape == out.mask.shape == (5, max(CLASSES.values()))
    atol, rtol = (1e-10, 1e-9) if dtype == torch.float64 else (2e-5, 2e-4)
    for name in dict.fromkeys(tasks):
        rows = [b for b, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            expected = alone(task_folders[name], backend, dtype)(x[rows])  # [n, K_t]: the task alone, its samples
        K = CLASSES[name]
        torch.testing.assert_close(out.logits[rows, :K], expected, atol=atol, rtol=rtol)
        assert out.mask[rows, :K].all() and not out.mask[rows, K:].any()
        assert torch.isneginf(out.logits[rows, K:]).all()


def test_bf16_autocast_logits_equal_each_task_alone(task_folders):
    """Under bf16 autocast (the prompt pass in the parameters' dtype, the GEMMs as autocast runs them) a mixed
    batch's logits equal each task's model alone under the same autocast."""
    bank, x, tasks = bank_of(task_folders, "torch", torch.float32).train(), images(), ORDERS["mixed"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bank(x, tasks)
        bank.loss(out, torch.tensor([0, 1, 2, 0, 1])).backward()
    for name in CLASSES:
        rows = [b for b, task in enumerate(tasks) if task == name]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = alone(task_folders[name], "torch", torch.float32).train()(x[rows])
        torch.testing.assert_close(out.logits[rows, :CLASSES[name]], expected, atol=2e-2, rtol=5e-2)
    assert bank.prompts.grad.isfinite().all() and bank.head_weight.grad.isfinite().all()


@pytest.mark.parametrize("backend, order, layouts", [("torch", "mixed", "shared"), ("torch", "single", "shared"),
                                                     ("triton", "sorted", "shared"),
                                                     ("triton", "two_of_three", "shared"),
                                                     ("torch", "mixed", "different"), ("torch", "sorted", "different"),
                                                     ("triton", "mixed", "different")])
def test_training_gradients_equal_each_task_alone(tmp_path, backend, order, layouts):
    """bank.loss (the sum of each task's mean cross entropy and matching loss on its samples) gives every task's
    prompts, keys and head the gradients its model alone gets from its samples; tasks without samples get zeros.
    Tasks of different pool sizes and top-k: each task's own rows of the padded pools get its model's gradients, the
    padding zeros."""
    dtype, task_folders = DTYPES[backend], save_tasks(tmp_path, POOLS, options=LAYOUTS[layouts])
    bank, x, tasks = bank_of(task_folders, backend, dtype).train(), images(dtype=dtype), ORDERS[order]
    labels = torch.tensor([b % 3 for b in range(5)])
    params = [p for p in bank.parameters() if p.requires_grad]
    own = [bank.prompts, *bank.layers.parameters(), bank.head_weight, bank.head_bias]
    assert sorted(map(id, params)) == sorted(map(id, own))  # the bank's own only: the backbone's are frozen
    grads = dict(zip(map(id, params), torch.autograd.grad(bank.loss(bank(x, tasks), labels), params)))
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-3)
    for t, name in enumerate(CLASSES):
        rows, K = [b for b, task in enumerate(tasks) if task == name], CLASSES[name]
        own_cls, own_img = bank.layouts[t][:2]  # this task's pool sizes
        own = own_rows(bank, t)  # its rows of the padded prompts
        keys = [(grads[id(getattr(layer, n))][t], size) for layer in bank.layers
                for n, size in (("keys_cls", own_cls), ("keys_img", own_img))]  # the padded pools, its own size
        bank_grads = [g[:size] for g, size in keys]
        bank_grads += [grads[id(bank.prompts)][:, t, own], grads[id(bank.head_weight)][t, :K],
                       grads[id(bank.head_bias)][t, :K]]
        assert not grads[id(bank.head_weight)][t, K:].any() and not grads[id(bank.head_bias)][t, K:].any()
        assert not grads[id(bank.prompts)][:, t, ~own].any() and not any(g[size:].any() for g, size in keys)
        if not rows:
            assert not any(g.any() for g in bank_grads), name
            continue
        model = alone(task_folders[name], backend, dtype).train()
        loss = torch.nn.functional.cross_entropy(model(x[rows]), labels[rows]) + 0.01 * tk.get_matching_loss(model)
        keys = [getattr(blk.tcpa, n) for blk in model.blocks for n in ("keys_cls", "keys_img")]
        prompts = [getattr(blk.tcpa, n) for blk in model.blocks for n in ("prompts_cls", "prompts_img")]
        expected = torch.autograd.grad(loss, [*keys, *prompts, model.head.weight, model.head.bias])
        pools = expected[len(keys):-2]  # per layer: prompts_cls [Pc, Lc, C], prompts_img [Pi, Li, C]
        expected = [*expected[:len(keys)], torch.stack([torch.cat([c.flatten(0, 1), i.flatten(0, 1)])
                                                        for c, i in zip(pools[::2], pools[1::2])]),
                    *expected[-2:]]  # the prompts as the bank holds them: [L, P, C], CLS pool first
        for got, want in zip(bank_grads, expected):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_prompters_equal_each_task_alone(tmp_path, backend):
    """Tasks saved with an input prompter (the published CUB recipe) and without, in one bank: each image goes
    through its own task's prompter (none: unchanged). Logits and the prompters' gradients equal each task's model
    alone; a task without one gets no gradient in its empty slots and is saved back without one."""
    dtype = DTYPES[backend]
    options = {"shirts": {"input_prompter": True}, "bags": {"input_prompter": True}}
    folders = save_tasks(tmp_path, POOLS, options=options)
    bank = tk.PromptBank(tiny_vit(dtype), folders, backend=backend).train()
    x, tasks, labels = images(dtype=dtype), ORDERS["mixed"], torch.tensor([b % 3 for b in range(5)])
    out = bank(x, tasks)
    grads = torch.autograd.grad(bank.loss(out, labels), list(bank.input_prompters.parameters()))
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-3)
    for t, name in enumerate(CLASSES):
        rows = [b for b, task in enumerate(tasks) if task == name]
        model = alone(folders[name], backend, dtype).train()
        logits = model(x[rows])
        torch.testing.assert_close(out.logits[rows, :CLASSES[name]], logits.detach(), atol=atol, rtol=rtol)
        prompter = model.patch_embed._modules.get("input_prompter")
        if prompter is None:
            assert not any(g[t].any() for g in grads), name
            continue
        loss = torch.nn.functional.cross_entropy(logits, labels[rows]) + 0.01 * tk.get_matching_loss(model)
        expected = torch.autograd.grad(loss, [prompter.conv1.weight, prompter.conv1.bias, prompter.prelu.weight,
                                              prompter.conv2.weight, prompter.conv2.bias])
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got[t], want, atol=atol, rtol=rtol, msg=name)
    bank.save_pretrained({"bags": tmp_path / "bags-2", "shoes": tmp_path / "shoes-2"})
    bags = tk.from_pretrained(tiny_vit(dtype), tmp_path / "bags-2").patch_embed.input_prompter
    torch.testing.assert_close(bags.conv2.weight, bank.input_prompters.conv2_weight[2])
    assert "input_prompter" not in tk.from_pretrained(tiny_vit(dtype), tmp_path / "shoes-2").patch_embed._modules
    record, _, _, tensors = read_checkpoint(folders["bags"], "dir")  # a prompter task's file without one tensor
    write_folder(tmp_path / "broken", record, {k: v for k, v in tensors.items() if not k.endswith("conv2.weight")})
    model = tiny_vit(dtype)
    with pytest.raises(ValueError, match=r"tasks\['broken'\]: expected its input prompter patch_embed\.input_prompter"
                                         r"\.\* of shapes .*got .*'conv2\.weight': None"):
        tk.PromptBank(model, {"shoes": folders["shoes"], "broken": tmp_path / "broken"})
    assert not hasattr(model, "prompt_state")


@pytest.mark.parametrize("family", ["eva02", "vit_res_post_block", "vit_parallel_scaling_block"])
def test_other_timm_families_equal_each_task_alone(family, tmp_path):
    """Every timm block family whose prompt K/V are one batched projection (the selection carries the tasks into
    its attention modules or its own attention): logits and gradients of a mixed batch, fp64, torch backend."""
    def backbone():
        torch.manual_seed(0)
        return TIMM_FAMILIES[family]().double().eval()

    folders = save_tasks(tmp_path, POOLS, backbone)
    bank, x, tasks = tk.PromptBank(backbone(), folders).train(), images(dtype=torch.float64), ORDERS["mixed"]
    out = bank(x, tasks)
    grads = torch.autograd.grad(bank.loss(out, torch.tensor([1, 0, 2, 1, 0])), [bank.prompts, bank.head_bias])
    for t, name in enumerate(CLASSES):
        rows, K = [b for b, task in enumerate(tasks) if task == name], CLASSES[name]
        model = tk.from_pretrained(backbone(), folders[name]).train()
        logits = model(x[rows])
        torch.testing.assert_close(out.logits[rows, :K], logits, atol=1e-10, rtol=1e-9)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 2, 1, 0])[rows])
        loss = loss + 0.01 * tk.get_matching_loss(model)
        expected = torch.autograd.grad(loss, [blk.tcpa.prompts_img for blk in model.blocks] + [model.head.bias])
        cls_rows = POOLS["pool_size_cls"] * POOLS["prompt_len_cls"]
        for i, want in enumerate(expected[:-1]):
            torch.testing.assert_close(grads[0][i, t, cls_rows:], want.flatten(0, 1), atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(grads[1][t, :K], expected[-1], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["vit_classifier", "dinov2_classifier_swiglu"])
def test_hugging_face_classifiers_equal_each_task_alone(name, tmp_path):
    """A Hugging Face image classifier as the backbone: its classifier's input through the bank's heads; logits and
    gradients of a mixed batch equal each task's model alone (fp64, torch backend; one task with an input prompter
    in front of the model's patch embedding); tasks save back."""
    pytest.importorskip("transformers")
    from tests.test_hf import plain_model

    folders = save_tasks(tmp_path, POOLS, lambda: plain_model(name), options={"shoes": {"input_prompter": True}})
    bank, x, tasks = tk.PromptBank(plain_model(name), folders).train(), images(dtype=torch.float64), ORDERS["mixed"]
    out = bank(x, tasks)
    grads = torch.autograd.grad(bank.loss(out, torch.tensor([1, 0, 2, 1, 0])), [bank.head_weight])
    for t, task in enumerate(CLASSES):
        rows, K = [b for b, task_b in enumerate(tasks) if task_b == task], CLASSES[task]
        model = tk.from_pretrained(plain_model(name), folders[task]).train()
        logits = model(pixel_values=x[rows]).logits
        torch.testing.assert_close(out.logits[rows, :K], logits, atol=1e-10, rtol=1e-9)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 2, 1, 0])[rows])
        (expected,) = torch.autograd.grad(loss + 0.01 * tk.get_matching_loss(model), [model.classifier.weight])
        torch.testing.assert_close(grads[0][t, :K], expected, atol=1e-10, rtol=1e-8)
    bank.save_pretrained({"bags": tmp_path / "bags-2"})
    reloaded = tk.from_pretrained(plain_model(name), tmp_path / "bags-2").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, bank.eval()(x, ["bags"] * 5).logits[:, :4])


def test_tasks_save_back_to_folders_that_load_alone(task_folders, tmp_path):
    bank = bank_of(task_folders, "torch", torch.float32)
    with torch.no_grad():  # as a training step would: the saved folder holds the bank's values now
        bank.prompts[1, 2].add_(0.25)
        bank.layers[0].keys_img[2].mul_(-1)
        bank.head_bias[2].sub_(1.0)
    bank.save_pretrained({"bags": tmp_path / "bags-2"})
    x = images()
    with torch.no_grad():
        expected = bank(x, ["bags"] * 5).logits[:, :CLASSES["bags"]]
        reloaded = alone(tmp_path / "bags-2", "torch", torch.float32)(x)
        before = alone(task_folders["bags"], "torch", torch.float32)(x)
    torch.testing.assert_close(reloaded, expected)
    assert not torch.allclose(before, expected)
    with pytest.raises(ValueError, match=r"dirs: unknown task\(s\) \['hats'\]"):
        bank.save_pretrained({"hats": tmp_path / "hats"})


def test_torch_compile_runs_the_bank(task_folders):
    """torch.compile(bank) with task names (Python values: the graph specialises on them) gives the eager logits and
    trains."""
    bank, x, tasks = bank_of(task_folders, "torch", torch.float32).train(), images(), ORDERS["mixed"]
    expected = bank(x, tasks)
    compiled = torch.compile(bank, backend="aot_eager")(x, tasks)
    torch.testing.assert_close(compiled.logits, expected.logits)  # -inf where expected is
    bank.loss(compiled, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert bank.prompts.grad is not None and bank.prompts.grad.abs().sum() > 0


@pytest.mark.parametrize("backend, per_sample", [("torch", False), ("triton", False), ("torch", True)])
def test_fullgraph_compile_with_task_numbers(task_folders, backend, per_sample):
    """Task numbers in a tensor: a train step (forward and the bank's loss) compiles to one graph, no sync (what CUDA
    graphs need), and gives eager's loss and every gradient (the same dropout masks from the same seed), with one
    mask per task for the batch or one per sample."""
    bank, x = bank_of(task_folders, backend, torch.float32).train(), images()
    bank.model.prompt_state.config.prompt_dropout = 0.3  # the bank's forward draws the masks
    bank.model.prompt_state.config.prompt_dropout_per_sample = per_sample
    trainable = {name: p for name, p in bank.named_parameters() if p.requires_grad}
    tasks, labels = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([0, 1, 2, 0, 1])

    def step(images, tasks, labels):
        return bank.loss(bank(images, tasks), labels)

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(3)
        loss = run(x, tasks, labels)
        results.append((loss.detach(), torch.autograd.grad(loss, list(trainable.values()))))
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss)
    for name, g, compiled_g in zip(trainable, grads, compiled_grads):
        torch.testing.assert_close(compiled_g, g, msg=name)


def test_compiled_task_numbers_out_of_range_raise(task_folders):
    """Compiled, the range of the task numbers is asserted on the device instead of read back: still an error."""
    compiled = torch.compile(bank_of(task_folders, "torch", torch.float32).eval(), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"tasks: expected task numbers in \[0, 3\)"):
        compiled(images(), torch.tensor([0, 1, 3, 0, 2]))


class _GemmRows(TorchDispatchMode):
    """The rows of every batched GEMM's first operand (the prompt pass's [L, M, C] @ [L, C, R]) while active."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
            self.rows.append(args[-2].shape[1])
        return func(*args, **(kwargs or {}))


def test_prompt_kv_of_the_batch_tasks_only(task_folders):
    """Task names, known on the host: the prompt pass projects the prompts of the batch's tasks only (M = T' * P
    rows); task numbers in a tensor: every task's (reading them would sync). Both give the same logits."""
    bank, x, P = bank_of(task_folders, "torch", torch.float64), images(dtype=torch.float64), 3 * 2 + 4 * 1
    tasks = ORDERS["two_of_three"]
    numbers = torch.tensor([bank.task_names.index(t) for t in tasks])
    with torch.no_grad():
        with _GemmRows() as by_name:
            named = bank(x, tasks)
        with _GemmRows() as by_number:
            numbered = bank(x, numbers)
    assert by_name.rows == [2 * P] and by_number.rows == [3 * P]
    torch.testing.assert_close(named.logits, numbered.logits, atol=1e-12, rtol=1e-12)


class _LargestOutput(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while active (a kernel op's outputs included)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_forward_makes_no_per_sample_copy_of_prompt_kv(tmp_path):
    """With the published pools (P = 36) at B=16 a per-sample copy of one layer's prompt K/V ([B, 2, H, P, D],
    B * P * 2C elements) would be the forward's largest tensor, 2.7x the next (the K/V of every task and layer, the
    images): no op the forward dispatches returns one (the kernel ops' outputs included; what the Triton launchers
    allocate inside them: tests/test_bank_attention.py)."""
    folders = save_tasks(tmp_path, POOLS | dict(pool_size_cls=18, pool_size_img=18, prompt_len_cls=1))
    bank, B = bank_of(folders, "triton", torch.float32), 16
    tasks = [list(CLASSES)[b % 3] for b in range(B)]
    with torch.no_grad(), _LargestOutput() as log:
        bank(images(B), tasks)
    P, C, L, T = 36, 32, 2, 3
    assert max(L * T * P * 2 * C, B * 3 * 16 * 16) <= log.largest < B * P * 2 * C


def test_the_backbone_alone_refuses_to_run(task_folders):
    """bank.model holds placeholder prompt modules (the tasks are the bank's parameters): run alone it would use them
    silently; it raises instead, naming the bank's call. The bank runs, and remove_prompts gives the plain model."""
    bank = bank_of(task_folders, "torch", torch.float32)
    with pytest.raises(RuntimeError, match=r"call bank\(images, tasks\)"):
        bank.model(images())
    bank(images(), ORDERS["mixed"])
    torch.testing.assert_close(tk.remove_prompts(bank.model)(images()), tiny_vit()(images()))


def test_backend_and_prompt_dropout_are_the_banks_own(tmp_path):
    """The backend and the prompt dropout a task was saved with are not part of its pool layout: the bank takes its
    own (``backend=``, ``prompt_dropout=``, ``prompt_dropout_per_sample=``). Without them, tasks that disagree are
    refused, naming the field and the argument. A task saved back keeps its own values."""
    options = {"shirts": {"backend": "auto", "prompt_dropout": 0.0}, "shoes": {"prompt_dropout": 0.3}}
    folders = save_tasks(tmp_path, POOLS, options=options)
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"tasks\['shoes'\]: a bank's tasks share .*, got prompt_dropout 0.3 \(task "
                                         r"'shirts': 0.0\); pass prompt_dropout= to the bank"):
        tk.PromptBank(model, folders)
    assert not hasattr(model, "prompt_state")
    bank = tk.PromptBank(model, folders, backend="torch", prompt_dropout=0.2)
    assert (bank.model.prompt_state.config.backend, bank.model.prompt_state.config.prompt_dropout) == ("torch", 0.2)
    x = images()
    with torch.no_grad():
        for name in folders:
            torch.testing.assert_close(bank(x, [name] * 5).logits[:, :CLASSES[name]],
                                       alone(folders[name], "torch", torch.float32)(x))
    bank.save_pretrained({"shirts": tmp_path / "shirts-2"})
    config = tk.from_pretrained(tiny_vit(), tmp_path / "shirts-2").prompt_state.config
    assert (config.backend, config.prompt_dropout) == ("auto", 0.0)
    folders = save_tasks(tmp_path / "masks", POOLS, options={"bags": {"prompt_dropout_per_sample": True}})
    with pytest.raises(ValueError, match=r"tasks\['bags'\]: .*got prompt_dropout_per_sample True \(task 'shirts': "
                                         r"False\); pass prompt_dropout_per_sample= to the bank"):
        tk.PromptBank(tiny_vit(), folders)
    bank = tk.PromptBank(tiny_vit(), folders, prompt_dropout_per_sample=True)
    assert bank.model.prompt_state.config.prompt_dropout_per_sample


def test_bank_errors_leave_the_model_as_it_was(task_folders, tmp_path):
    model = tiny_vit()
    other = tk.apply_tcpa(tiny_vit(), backend="torch", num_classes=2, **(POOLS | dict(renormalize=True)))
    tk.save_pretrained(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"tasks\['other'\]: a bank's tasks share their mask semantics and prompt "
                                         r"transform .*got renormalize True \(task 'shirts': False\)"):
        tk.PromptBank(model, task_folders | {"other": tmp_path / "other"})
    large = tk.apply_tcpa(tiny_vit(), backend="torch", num_classes=2, **(POOLS | dict(pool_size_img=61)))
    tk.save_pretrained(large, tmp_path / "large")  # 3 + 61 entries alone, 4 + 61 padded with another task's pools
    small_img = tk.apply_tcpa(tiny_vit(), backend="torch", num_classes=2, **(POOLS | dict(pool_size_cls=4)))
    tk.save_pretrained(small_img, tmp_path / "small_img")
    with pytest.raises(ValueError, match=r"tasks: the bank pads every task's pools to the largest CLS pool and the "
                                         r"largest image pool, at most 64 entries together, got 4 \+ 61"):
        tk.PromptBank(model, {"large": tmp_path / "large", "small_img": tmp_path / "small_img"})
    record, _, _, tensors = read_checkpoint(tmp_path / "small_img", "dir")  # pools not of its own config's sizes
    tensors["blocks.1.tcpa.prompts_cls"] = tensors["blocks.1.tcpa.prompts_cls"][:3]
    write_folder(tmp_path / "cut", record, tensors)
    with pytest.raises(ValueError, match=r"tasks\['cut'\]: blocks\.1\.tcpa\.prompts_cls: expected shape \(4, 2, 32\), "
                                         r"got \(3, 2, 32\)"):
        tk.PromptBank(model, task_folders | {"cut": tmp_path / "cut"})
    with pytest.raises(FileNotFoundError, match=r"tasks\['nope'\]: expected a prompts file"):
        tk.PromptBank(model, {"nope": tmp_path / "missing"})
    with pytest.raises(ValueError, match="tasks: expected a non-empty mapping"):
        tk.PromptBank(model, {})
    assert not hasattr(model, "prompt_state")
    with pytest.raises(ValueError, match="model: expected the plain backbone"):
        tk.PromptBank(other, task_folders)
    things = TIMM_FAMILIES["vit_parallel_things_block"]()  # each branch projects its own prompts: no batched pass
    tk.save_pretrained(tk.apply_tcpa(TIMM_FAMILIES["vit_parallel_things_block"](), backend="torch", **POOLS),
                       tmp_path / "things")
    with pytest.raises(ValueError, match="model: a prompt bank runs on .* blocks whose prompt K/V are one batched "
                                         "projection .*got VisionTransformer with ParallelThingsBlock"):
        tk.PromptBank(things, {"things": tmp_path / "things"})
    assert not hasattr(things, "prompt_state")
    bank = tk.PromptBank(model, task_folders)
    with pytest.raises(ValueError, match=r"tasks: unknown task\(s\) \['hats'\]"):
        bank(images(2), ["hats", "shoes"])
    with pytest.raises(ValueError, match=r"tasks: expected one task name per sample \(2\)"):
        bank(images(2), ["shoes"])
    with pytest.raises(ValueError, match=r"tasks: expected task numbers in \[0, 3\), got \[0, 3\]"):
        bank(images(2), torch.tensor([0, 3]))


def test_different_pools_with_task_numbers_compile_and_save_back(tmp_path):
    """Tasks of different pool sizes and top-k: task numbers in a tensor (each sample's pools gathered on the device)
    give the logits task names give, a train step with them compiles to one graph with eager's loss and gradients,
    and a task saved back has its own pools and loads alone with the bank's logits."""
    folders = save_tasks(tmp_path, POOLS, options=LAYOUTS["different"])
    bank, x, tasks = bank_of(folders, "torch", torch.float64).train(), images(dtype=torch.float64), ORDERS["mixed"]
    numbers, labels = torch.tensor([bank.task_names.index(t) for t in tasks]), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(bank(x, numbers).logits, bank(x, tasks).logits, atol=1e-12, rtol=1e-12)
    trainable = [p for p in bank.parameters() if p.requires_grad]

    def step(images, tasks, labels):
        return bank.loss(bank(images, tasks), labels)

    losses, grads = [], []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss = run(x, numbers, labels)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, trainable))
    torch.testing.assert_close(losses[1], losses[0])
    for compiled_g, g in zip(*grads):
        torch.testing.assert_close(compiled_g, g)
    bank.eval().save_pretrained({"shirts": tmp_path / "shirts-2"})
    reloaded = alone(tmp_path / "shirts-2", "torch", torch.float64)
    assert tuple(reloaded.blocks[0].tcpa.keys_img.shape) == (6, 32)  # its own pool, not the bank's padded one
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), bank(x, ["shirts"] * 5).logits[:, :CLASSES["shirts"]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_selection_keeps_each_sample_in_its_own_pools(backend):
    """The published recipe's first epochs select at random: with per-sample layouts each token still picks its own
    k among its own pool's entries (the kernel and its torch twin; the bank's blocks run this op)."""
    from tcpa_kernels.ops.selection import entry_selection, topk_bits

    layouts = torch.tensor([[2, 6, 1, 3, 1, 1], [4, 3, 3, 1, 1, 1], [3, 4, 2, 2, 1, 1]])  # (Pc, Pi, k_cls, k_img, ..)
    scores = torch.rand(3, 5, 4 + 6, generator=torch.Generator().manual_seed(0))
    bits = topk_bits(scores, num_prefix_tokens=1, pool_cls=4, k_cls=3, k_img=3, backend=backend, layouts=layouts)
    picked = entry_selection(bits, 10)  # [B, N, E]
    for b, (own_cls, own_img, k_cls, k_img, _, _) in enumerate(layouts.tolist()):
        assert picked[b, :1, :own_cls].sum(-1).eq(k_cls).all() and not picked[b, :1, own_cls:].any()
        assert picked[b, 1:, 4:4 + own_img].sum(-1).eq(k_img).all() and not picked[b, 1:, :4].any()
        assert not picked[b, 1:, 4 + own_img:].any()
    expected = topk_bits(scores, num_prefix_tokens=1, pool_cls=4, k_cls=3, k_img=3, backend="torch", layouts=layouts)
    assert torch.equal(bits, expected)


def test_fourier_tasks_of_different_pool_sizes_are_refused(tmp_path):
    """The Fourier transform mixes a layer's prompt tokens among themselves, so zero rows padding a smaller task's
    pools would change its prompts: such tasks must share their pool sizes and prompt lengths (their top-k may
    differ)."""
    fourier = POOLS | dict(prompt_transform="fourier")
    folders = save_tasks(tmp_path, fourier, options={"shoes": dict(topk_cls=1)})
    tk.PromptBank(tiny_vit(), folders)  # different top-k: no padding
    folders = save_tasks(tmp_path / "sizes", fourier, options={"shoes": dict(pool_size_img=5)})
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"tasks\['shoes'\]: .*\(and with Fourier prompts their pool sizes and prompt "
                                         r"lengths\), got pool_size_img 5 \(task 'shirts': 4\)"):
        tk.PromptBank(model, folders)
    assert not hasattr(model, "prompt_state")


@pytest.mark.parametrize("backend, layouts, form", [("torch", "shared", "names"), ("torch", "different", "numbers"),
                                                    ("triton", "different", "names")])
def test_prompt_dropout_per_sample_equals_each_sample_alone(tmp_path, backend, layouts, form, monkeypatch):
    """Tasks saved with a prompt-dropout mask per sample (the published code's): in training each sample attends to
    its task's prompts under its own mask, ``[L, B, P, C]`` drawn in one call. Each sample's logits, and every
    task's gradients, equal its task's model alone on that sample with its prompts multiplied by that sample's
    mask (rescaled), the task's loss the mean over its samples; task names or numbers."""
    dtype, p = DTYPES[backend], 0.4
    folders = save_tasks(tmp_path, POOLS | dict(prompt_dropout=p, prompt_dropout_per_sample=True),
                         options=LAYOUTS[layouts])
    bank, x, tasks = bank_of(folders, backend, dtype).train(), images(dtype=dtype), ORDERS["mixed"]
    labels = torch.tensor([b % 3 for b in range(5)])
    seeds = recorded_seeds(monkeypatch)  # the triton backend's: the prompt K/V kernels draw the masks
    torch.manual_seed(7)
    out = bank(x, tasks if form == "names" else torch.tensor([bank.task_names.index(t) for t in tasks]))
    shape = (bank.prompts.shape[0], 5, *bank.prompts.shape[2:])  # the bank's one draw: every layer's prompt rows
    if backend == "triton":  # of every sample, [L, B, P, C]
        masks = philox_multipliers(seeds[0], shape, p).to(dtype)
    else:
        torch.manual_seed(7)
        masks = torch.nn.functional.dropout(torch.ones(shape, dtype=dtype), p)
    assert not torch.equal(masks[:, 0], masks[:, 2])  # two samples of one task: their own masks
    grads = torch.autograd.grad(bank.loss(out, labels), [bank.prompts, bank.head_bias])
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-3)
    for t, name in enumerate(CLASSES):
        rows, K = [b for b, task in enumerate(tasks) if task == name], CLASSES[name]
        model = alone(folders[name], backend, dtype).train()
        model.prompt_state.config.prompt_dropout = 0.0  # the bank's masks instead, applied below
        own = own_rows(bank, t)
        params = [getattr(blk.tcpa, n) for blk in model.blocks for n in ("prompts_cls", "prompts_img")]
        loss = 0
        for b in rows:  # the sample alone, its task's prompts under its own mask
            masked = {}
            for i, blk in enumerate(model.blocks):
                cls, img = blk.tcpa.prompts_cls, blk.tcpa.prompts_img
                mask_cls, mask_img = masks[i, b, own].split_with_sizes((cls[:, :, 0].numel(), img[:, :, 0].numel()))
                masked |= {f"blocks.{i}.tcpa.prompts_cls": cls * mask_cls.view_as(cls),
                           f"blocks.{i}.tcpa.prompts_img": img * mask_img.view_as(img)}
            logits = torch.func.functional_call(model, masked, (x[b:b + 1],))
            torch.testing.assert_close(out.logits[b:b + 1, :K], logits, atol=atol, rtol=rtol, msg=f"sample {b}")
            loss = loss + torch.nn.functional.cross_entropy(logits, labels[b:b + 1]) + 0.01 * tk.get_matching_loss(
                model)
        expected = torch.autograd.grad(loss / len(rows), [*params, model.head.bias])
        for i in range(len(model.blocks)):
            want = torch.cat([expected[2 * i].flatten(0, 1), expected[2 * i + 1].flatten(0, 1)])
            torch.testing.assert_close(grads[0][i, t, own], want, atol=atol, rtol=rtol)
        torch.testing.assert_close(grads[1][t, :K], expected[-1], atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend, layouts", [("torch", "different"), ("triton", "shared")])
def test_open_clip_features_and_gradients_equal_each_task_alone(tmp_path, backend, layouts):
    """An open_clip CLIP model (no head: image embeddings): ``bank.features`` gives each sample its task's model's
    ``encode_image``, and a loss on the features plus ``bank.matching_loss`` gives every task's prompts and keys
    its model's gradients; tasks save back without a head; with task numbers ``bank.features`` compiles to one
    graph; ``bank(images, tasks)`` and ``bank.loss`` say what to call instead."""
    open_clip = pytest.importorskip("open_clip")
    from tests.test_open_clip import TEXT, VISION

    dtype = DTYPES[backend]

    def clip():
        torch.manual_seed(0)
        return open_clip.CLIP(embed_dim=8, vision_cfg=VISION, text_cfg=TEXT).to(dtype).eval()

    folders = save_tasks(tmp_path, POOLS | {"num_classes": None}, clip, options=LAYOUTS[layouts])
    bank, x, tasks = tk.PromptBank(clip(), folders, backend=backend).train(), images(dtype=dtype), ORDERS["mixed"]
    out = bank.features(x, tasks)
    params = [bank.prompts, *bank.layers.parameters()]
    assert sorted(map(id, params)) == sorted(id(p) for p in bank.parameters() if p.requires_grad)
    grads = torch.autograd.grad(out.features.square().sum() + 0.01 * bank.matching_loss(out), params)
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-5, 1e-3)
    for t, name in enumerate(CLASSES):
        rows = [b for b, task in enumerate(tasks) if task == name]
        model = tk.from_pretrained(clip(), folders[name]).train()
        for blk in tk.find_model(model).prompt_state.blocks:
            blk.tcpa.config.backend = backend
        features = model.encode_image(x[rows])
        torch.testing.assert_close(out.features[rows], features, atol=atol, rtol=rtol)
        blocks = tk.find_model(model).prompt_state.blocks
        keys = [getattr(blk.tcpa, n) for blk in blocks for n in ("keys_cls", "keys_img")]
        prompts = [getattr(blk.tcpa, n) for blk in blocks for n in ("prompts_cls", "prompts_img")]
        expected = torch.autograd.grad(features.square().sum() + 0.01 * tk.get_matching_loss(model), keys + prompts)
        own, (own_cls, own_img) = own_rows(bank, t), bank.layouts[t][:2]
        for i in range(len(bank.layers)):
            torch.testing.assert_close(grads[1 + 2 * i][t, :own_cls], expected[2 * i], atol=atol, rtol=rtol)
            torch.testing.assert_close(grads[2 + 2 * i][t, :own_img], expected[2 * i + 1], atol=atol, rtol=rtol)
            want = torch.cat([p.flatten(0, 1) for p in expected[len(keys) + 2 * i:len(keys) + 2 * i + 2]])
            torch.testing.assert_close(grads[0][i, t, own], want, atol=atol, rtol=rtol)
    bank.save_pretrained({"shoes": tmp_path / "shoes-2"})
    reloaded = tk.from_pretrained(clip(), tmp_path / "shoes-2").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(x), bank.eval().features(x, ["shoes"] * 5).features,
                                   atol=atol, rtol=rtol)
    numbers = torch.tensor([bank.task_names.index(t) for t in tasks])
    compiled = torch.compile(bank.features, fullgraph=True, backend="aot_eager")  # one graph, task numbers
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, numbers).features, bank.features(x, tasks).features)
    with pytest.raises(ValueError, match=r"model: CLIP has no classification head to stack .*bank\.features"):
        bank(x, tasks)
    with pytest.raises(TypeError, match=r"output: expected the BankOutput of bank\(images, tasks\), got BankFeatures"):
        bank.loss(out, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("name", ["tower", "tower_custom_block", "clip_timm_trunk", "custom_text_clip_attn_pool"])
def test_open_clip_towers_features_equal_each_task_alone(tmp_path, name):
    """Every open_clip model kind the library prompts (a native tower, with open_clip's own attention, a tower
    wrapping a timm trunk, a CustomTextCLIP with an attentional pooler): each sample's features are its task's model
    alone (fp64, torch backend, tasks of different pools)."""
    pytest.importorskip("open_clip")
    from tests.test_open_clip import MODELS

    def backbone():
        torch.manual_seed(0)
        return MODELS[name]().double().eval()

    folders = save_tasks(tmp_path, POOLS | {"num_classes": None}, backbone, options=LAYOUTS["different"])
    size = 48 if name == "clip_timm_trunk" else 16
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = tk.PromptBank(backbone(), folders).features(x, ORDERS["mixed"])
        for task in CLASSES:
            rows = [b for b, t in enumerate(ORDERS["mixed"]) if t == task]
            model = tk.from_pretrained(backbone(), folders[task])
            expected = model.encode_image(x[rows]) if hasattr(model, "encode_image") else model(x[rows])
            torch.testing.assert_close(out.features[rows], expected, atol=1e-12, rtol=1e-10)
