"""A prompt bank's cost against one task's, CPU proxies (docs/how-it-works.md, 'Prompt banks'):

    python benchmarks/bank.py                      # census (ViT-B/16, batch 128, bf16) and host time
    python -m benchmarks.bank --tasks 8 --json bank.json
    python benchmarks/bank.py --time --json bank-gpu.json   # on a GPU: real steps, timed

- census (``benchmarks/census.py``'s method: one train step under FakeTensorMode, ops and bytes of every op that
  reaches the dispatcher, no compute): a ``PromptBank`` of ``--tasks`` tasks (pools 18 + 18, top-k 10, 10 classes
  each) on a mixed batch of ``--batch`` (tasks interleaved, the same number of samples each), loss
  ``bank.loss``; against one task's TCPA model on a batch of the same size, and against ``--tasks`` separate
  batches of ``batch / tasks`` on that model (what running each task's requests on its own costs).
- host time (``benchmarks/host.py``'s method: the ViT-B/16 structure at width 12, 16 px images, Triton launches
  stubbed, one thread, methods interleaved round by round): a train step of the bank on a mixed batch of
  ``--tasks`` images (one per task) against one task's model on the same number of images, and beside them a bank
  of that one task on those images (the bank's own host work, without T times the prompt rows: at width 12 the CPU
  computes the prompt pass's dropout, layer norm and GEMM over every task's rows, which a GPU runs as the same few
  launches).

Targets (issue text): the mixed batch <= 1.05x the single-task batch's ops and bytes, and <= 1.10x its host time.
These are proxies measured on the CPU, not GPU times. ``--time`` measures real steps instead (``measure_time``:
on a GPU, the mixed batch against the single-task batch and against the separate batches).
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (first: the kernels on CPU tensors need the interpreter)
import tcpa_kernels as tk  # noqa: E402
from benchmarks import census, host  # noqa: E402
from benchmarks.cli import at_least  # noqa: E402
from tcpa_kernels import bench  # noqa: E402

POOLS = dict(pool_size_cls=18, pool_size_img=18, topk_cls=10, topk_img=10, backend="triton")
CLASSES = 10  # per task
SMALL_POOLS = dict(pool_size_cls=12, pool_size_img=12, topk_cls=6, topk_img=6)  # --time: the odd tasks of a bank
TARGETS = {"ops": 1.05, "bytes": 1.05, "host": 1.10}


def task_folders(backbone, tasks: int, folder: Path) -> dict[str, Path]:
    """``tasks`` adapter folders of ``backbone()`` (each its own random pools, keys and head)."""
    model = tk.apply_tcpa(backbone(), num_classes=CLASSES, **POOLS)
    folders = {}
    for t in range(tasks):
        with torch.no_grad():
            for p in tk.trainable_parameters(model):
                p.uniform_(-1, 1)
        folders[f"task{t}"] = folder / f"task{t}"
        tk.save_pretrained(model, folders[f"task{t}"])
    return folders


def mixed_tasks(names: list[str], batch: int) -> list[str]:
    """Each task ``batch / len(names)`` times, interleaved (task0, task1, ..., task0, ...)."""
    return [names[b % len(names)] for b in range(batch)]


def bank_step(bank: tk.PromptBank, tasks: list[str], dtype: torch.dtype):
    """loss_fn(bank, images, labels) of a mixed-batch train step under autocast to ``dtype`` (CPU)."""

    def loss_fn(net, images, labels):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return net.loss(net(images, tasks), labels)

    return loss_fn


def single_step(model, dtype: torch.dtype):
    def loss_fn(net, images, labels):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
            return loss + 0.01 * tk.get_matching_loss(model)

    return loss_fn


def _counted(result: dict) -> dict:
    return {"ops": sum(result["ops"].values()), "bytes": sum(result["bytes"].values()),
            "saved_bytes": result["saved_bytes"]}


def measure_census(tasks: int, batch: int, img: int = 224, dtype=torch.bfloat16,
                   model_name: str = "vit_base_patch16_224") -> dict:
    """Ops and bytes of the mixed bank step, the single-task step and the separate batches' steps (summed)."""
    def backbone():
        import timm  # after benchmarks.interpreter: timm imports triton

        return timm.create_model(model_name, pretrained=False, img_size=img, num_classes=CLASSES)

    images = torch.randn(batch, 3, img, img)
    labels = torch.randint(0, CLASSES, (batch,))
    with tempfile.TemporaryDirectory() as folder:
        folders = task_folders(backbone, tasks, Path(folder))
        bank = tk.PromptBank(backbone(), folders, backend=POOLS["backend"]).train()
        mixed = _counted(census.count_step(bank, (images, labels), bank_step(bank, mixed_tasks(list(folders), batch),
                                                                              dtype)))
    model = tk.apply_tcpa(backbone(), num_classes=CLASSES, **POOLS).train()
    single = _counted(census.count_step(model, (images, labels), single_step(model, dtype)))
    part = batch // tasks
    model = tk.apply_tcpa(backbone(), num_classes=CLASSES, **POOLS).train()
    one = _counted(census.count_step(model, (images[:part], labels[:part]), single_step(model, dtype)))
    separate = {key: tasks * value for key, value in one.items()}
    return {"mixed": mixed, "single_task": single, "separate": separate,
            "ratios": {name: {key: figures[key] / single[key] for key in ("ops", "bytes")}
                       for name, figures in (("mixed", mixed), ("separate", separate))}}


def measure_host(tasks: int, rounds: int, steps: int, warmup: int, depth: int = 12) -> dict:
    """Host ms per train step (launches stubbed): the bank on ``tasks`` images, one per task, one task's model on as
    many, and a bank of that one task on them (``depth`` blocks of the ViT-B/16 structure); the ratios are
    ``host.paired_ratio``'s, round by round."""
    def backbone():
        import timm

        kwargs = dict(host.MODEL)
        return timm.create_model(kwargs.pop("model_name"), **(kwargs | dict(num_classes=CLASSES, depth=depth)))

    torch.manual_seed(0)
    images = torch.randn(tasks, 3, host.MODEL["img_size"], host.MODEL["img_size"])
    labels = torch.randint(0, CLASSES, (tasks,))
    with tempfile.TemporaryDirectory() as folder:
        folders = task_folders(backbone, tasks, Path(folder))
        bank = tk.PromptBank(backbone(), folders, backend=POOLS["backend"]).train()
        first = next(iter(folders))
        one_task = tk.PromptBank(backbone(), {first: folders[first]}, backend=POOLS["backend"]).train()
    model = tk.apply_tcpa(backbone(), num_classes=CLASSES, **POOLS).train()
    runs = {"mixed": (bank, bank_step(bank, mixed_tasks(list(folders), tasks), torch.float32)),
            "single_task": (model, single_step(model, torch.float32)),
            "one_task_bank": (one_task, bank_step(one_task, [first] * tasks, torch.float32))}

    def step_of(net, loss_fn):
        params = [p for p in net.parameters() if p.requires_grad]

        def step():
            loss_fn(net, images, labels).backward()
            for p in params:
                p.grad = None

        return step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for net, loss_fn in runs.values():  # real kernels once, in the interpreter
            step_of(net, loss_fn)()
        with host.kernels_stubbed():
            steps_of = {name: step_of(*run) for name, run in runs.items()}
            for step in steps_of.values():
                host._time_steps(step, warmup)
            per_round = {name: [] for name in runs}
            for _ in range(rounds):
                for name, step in steps_of.items():
                    per_round[name].append(statistics.median(host._time_steps(step, steps)))
    finally:
        torch.set_num_threads(threads)
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    return {"median_ms": medians, "round_medians_ms": per_round,
            "ratio": host.paired_ratio(per_round["mixed"], per_round["single_task"]),
            "one_task_bank_ratio": host.paired_ratio(per_round["one_task_bank"], per_round["single_task"])}


def measure_time(tasks: int, batch: int, device: torch.device, *, img: int = 224, dtype=torch.bfloat16,
                 model_name: str = "vit_base_patch16_224", reps: int = 10, graphs: bool = False) -> dict:
    """Wall time (ms; CUDA events on a GPU) of real train steps (forward, loss, backward, AdamW) and eval
    forwards, in interleaved rounds (``bench.interleaved_samples``): the bank on a mixed batch, one task's model on
    the same batch, and that model on ``tasks`` separate batches of ``batch / tasks`` (one figure: all of them);
    ``mixed_pools``: a bank whose odd tasks have smaller pools (``SMALL_POOLS``, padded: per-sample layouts in the
    kernels) on the mixed batch; with
    ``graphs`` on a GPU also the bank's mixed eval forward captured in CUDA graphs (``torch.compile(bank,
    mode="reduce-overhead", fullgraph=True)``, task numbers in a tensor; a compiler failure is noted, the other
    figures stand). For a GPU (``gpu_run.sh run3``); on the CPU it runs the torch backend."""
    def backbone():
        import timm

        return timm.create_model(model_name, pretrained=False, img_size=img, num_classes=CLASSES).to(device)

    images = torch.randn(batch, 3, img, img, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    pools = POOLS | {"backend": "auto"}
    with tempfile.TemporaryDirectory() as folder:
        model = tk.apply_tcpa(backbone(), num_classes=CLASSES, **pools)
        small = tk.apply_tcpa(backbone(), num_classes=CLASSES, **(pools | SMALL_POOLS))
        folders, pool_folders = {}, {}
        for t in range(tasks):
            folders[f"task{t}"] = Path(folder) / f"task{t}"
            tk.save_pretrained(model, folders[f"task{t}"])
            pool_folders[f"task{t}"] = Path(folder) / f"pools{t}"
            tk.save_pretrained(small if t % 2 else model, pool_folders[f"task{t}"])
        bank = tk.PromptBank(backbone(), folders, backend=pools["backend"])
        pools_bank = tk.PromptBank(backbone(), pool_folders, backend=pools["backend"])
        del small
    names = mixed_tasks(list(folders), batch)
    part = batch // tasks

    def trainer(net, loss_of):
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)

        def step(x, y):
            net.train()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_of(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    bank_train = trainer(bank, lambda x, y: bank.loss(bank(x, names[:len(x)]), y))
    pools_train = trainer(pools_bank, lambda x, y: pools_bank.loss(pools_bank(x, names), y))
    model_train = trainer(model, lambda x, y: torch.nn.functional.cross_entropy(model(x), y)
                          + 0.01 * tk.get_matching_loss(model))

    @torch.no_grad()
    def infer(run):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            run()

    steps = {"train_mixed": lambda: bank_train(images, labels),
             "train_mixed_pools": lambda: pools_train(images, labels),
             "train_single_task": lambda: model_train(images, labels),
             "train_separate": lambda: [model_train(images[i:i + part], labels[i:i + part])
                                        for i in range(0, batch, part)],
             "eval_mixed": lambda: infer(lambda: bank.eval()(images, names)),
             "eval_mixed_pools": lambda: infer(lambda: pools_bank.eval()(images, names)),
             "eval_single_task": lambda: infer(lambda: model.eval()(images)),
             "eval_separate": lambda: infer(lambda: [model.eval()(images[i:i + part]) for i in range(0, batch, part)])}
    notes = []
    if graphs and device.type == "cuda":  # serving the mixed batch as one captured graph: task numbers in a tensor
        numbers = torch.tensor([bank.task_names.index(name) for name in names], device=device)
        served = torch.compile(bank, mode="reduce-overhead", fullgraph=True)
        steps["eval_mixed_cuda_graphs"] = lambda: infer(lambda: served.eval()(images, numbers))
    for name, step in list(steps.items()):  # compilation, optimizer state
        try:
            step()
        except Exception as error:  # noqa: BLE001 (a compiler failure: the other figures stand)
            if name != "eval_mixed_cuda_graphs":
                raise
            notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            del steps[name]
    figures = {name: bench.summarize(samples) for name, samples in bench.interleaved_samples(steps, device,
                                                                                              reps).items()}
    ratios = {f"{mode}_{other}": figures[f"{mode}_mixed"]["median"] / figures[f"{mode}_{other}"]["median"]
              for mode in ("train", "eval") for other in ("single_task", "separate")}
    ratios |= {f"{mode}_pools_over_mixed": figures[f"{mode}_mixed_pools"]["median"] / figures[f"{mode}_mixed"]["median"]
               for mode in ("train", "eval")}  # what per-sample layouts cost
    return {"device": bench.environment(device), "settings": dict(tasks=tasks, batch=batch, img=img, model=model_name,
                                                                   dtype=str(dtype), reps=reps),
            "ms": figures, "mixed_over": ratios, "notes": notes}


def format_report(result: dict) -> str:
    c, h = result["census"], result["host"]
    lines = [f"census, ViT-B/16, batch {result['settings']['batch']}, bf16 (CPU proxy: ops and bytes, no compute):",
             "| step | ops | GB in+out | saved GB | ops vs single task | bytes vs single task |",
             "|---|---|---|---|---|---|"]
    for name in ("single_task", "mixed", "separate"):
        f = c[name]
        ratio = c["ratios"].get(name, {"ops": 1.0, "bytes": 1.0})
        lines.append(f"| {name} | {f['ops']} | {f['bytes'] / 1e9:.2f} | {f['saved_bytes'] / 1e9:.2f} | "
                     f"{ratio['ops']:.3f}x | {ratio['bytes']:.3f}x |")
    lines += ["", f"host time of a train step, launches stubbed (CPU proxy), {result['settings']['tasks']} images: "
              f"mixed {h['median_ms']['mixed']:.3f} ms, single task {h['median_ms']['single_task']:.3f} ms, "
              f"{h['ratio']:.3f}x; a bank of that one task {h['median_ms']['one_task_bank']:.3f} ms, "
              f"{h['one_task_bank_ratio']:.3f}x", "",
              f"targets: mixed <= {TARGETS['ops']}x ops and <= {TARGETS['bytes']}x bytes of the single-task batch, "
              f"<= {TARGETS['host']}x its host time"]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python benchmarks/bank.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks in the bank (default 8)")
    parser.add_argument("--batch", type=int, default=128, help="census batch, a multiple of --tasks (default 128)")
    parser.add_argument("--rounds", type=int, default=7, help="host-time rounds (default 7)")
    parser.add_argument("--steps", type=int, default=15, help="host-time steps per round (default 15)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--time", action="store_true",
                        help="instead, time real train steps and eval forwards on the device (a GPU: bf16, ViT-B/16)")
    parser.add_argument("--graphs", action="store_true",
                        help="with --time on a GPU, also the mixed eval forward captured in CUDA graphs (a compile)")
    args = parser.parse_args(argv)
    at_least(parser, args, 1, "tasks", "batch", "rounds", "steps")
    at_least(parser, args, 0, "warmup")
    if args.batch % args.tasks:
        parser.error(f"--batch: expected a multiple of --tasks ({args.tasks}), got {args.batch}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.time:
        result = measure_time(args.tasks, args.batch, bench.default_device(), graphs=args.graphs)
        print("\n".join(f"{name}: {f['median']:.2f} ms [{f['min']:.2f}-{f['max']:.2f}]"
                        for name, f in result["ms"].items()))
        print("mixed / other:", {k: round(v, 3) for k, v in result["mixed_over"].items()})
        print("\n".join(f"note: {note}" for note in result["notes"]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
              "census": measure_census(args.tasks, args.batch),
              "host": measure_host(args.tasks, args.rounds, args.steps, args.warmup),
              "environment": host.environment()}
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
