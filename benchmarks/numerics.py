"""Numerical agreement with the fp64 reference, per backend, dtype and tensor (output and the five gradients).

    python benchmarks/numerics.py            # writes benchmarks/results/numerics-<device>.{json,md}

Errors are normalised by the reference tensor's magnitude (elementwise relative error is meaningless near 0):
  max_rel  = max|x - ref| / max|ref|        mean_rel = mean|x - ref| / mean|ref|
On CPU the "triton" rows are the real kernels under the Triton interpreter (numpy arithmetic); bf16 needs a GPU
(bf16 tl.dot is broken in the interpreter). Shape: ViT-B-like heads at a small batch.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (first: the Triton interpreter for the CPU "triton" rows)
import tcpa_kernels as tk  # noqa: E402
from reference import tcpa_attention_ref  # noqa: E402
from tcpa_kernels import bench  # noqa: E402

NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v")


def errors(B, H, N, P, D, dtype, backend, renormalize, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, N, D)] * 3 + [(H, P, D)] * 2
    tensors = [torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    mask = (torch.rand(B, N, P, generator=g) < 0.3).to(device)
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    ref = tcpa_attention_ref(*ref_tensors, mask, renormalize=renormalize)
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(device)
    ref_all = [ref, *torch.autograd.grad(ref, ref_tensors, grad_out)]
    out = tk.tcpa_attention(*tensors, mask, renormalize=renormalize, backend=backend)
    got_all = [out, *torch.autograd.grad(out, tensors, grad_out.to(dtype))]
    result = {}
    for name, got, want in zip(NAMES, got_all, ref_all):
        diff = (got.double() - want).abs()
        result[name] = {"max_rel": float(diff.max() / want.abs().max()),
                        "mean_rel": float(diff.mean() / want.abs().mean())}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--shape", type=int, nargs=5, default=[2, 12, 197, 36, 64], metavar=("B", "H", "N", "P", "D"))
    args = parser.parse_args()
    device = bench.default_device()
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for backend in ("triton", "torch"):
        for dtype in dtypes:
            for renormalize in (False, True):
                errs = errors(*args.shape, dtype, backend, renormalize, device)
                rows.append({"backend": backend, "dtype": str(dtype).replace("torch.", ""),
                             "renormalize": renormalize, "errors": errs})
                print(backend, dtype, renormalize, {k: f"{v['max_rel']:.1e}" for k, v in errs.items()}, flush=True)
    env = bench.environment(device)
    slug = bench.device_slug(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "shape_BHNPD": args.shape, "triton_interpreter": device.type != "cuda",
               "rows": rows}
    (out / f"numerics-{slug}.json").write_text(json.dumps(payload, indent=2))
    header = "| backend | dtype | renormalize | " + " | ".join(f"{n} max / mean" for n in NAMES) + " |"
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}"
             f"{' (Triton interpreter)' if device.type != 'cuda' else ''}; shape B,H,N,P,D = {args.shape}", "",
             header, "|" + "---|" * (3 + len(NAMES))]
    for r in rows:
        cells = " | ".join(f"{r['errors'][n]['max_rel']:.1e} / {r['errors'][n]['mean_rel']:.1e}" for n in NAMES)
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['renormalize']} | {cells} |")
    (out / f"numerics-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
