"""Argument checks that name the argument, what was expected and what was received."""

import math

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)
MAX_POOL_ENTRIES = 64  # one int64 selection word per token


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name, t, *, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim}-d tensor, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {describe(t)}")


def check_same(name, t, ref_name, ref, *, shape=None):
    """t must share ref's dtype and device, and have ``shape`` if given."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {describe(t)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {describe(t)}")


def check_attention_inputs(q, k, v, prompt_k, prompt_v, float_dtypes, bank=False):
    """Validate q/k/v [B,H,N,D] and prompt_k/prompt_v [H,P,D] or [B,H,P,D] (``bank``: [T,H,P,D], T >= 1 prompt
    sets); return (B, H, N, P, D)."""
    check_tensor("q", q, ndim=4, dtypes=float_dtypes)
    B, H, N, D = q.shape
    if D < 1:
        raise ValueError(f"q: expected shape [B, H, N, D] with head dim D >= 1, got {describe(q)}")
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same("k", k, "q", q, shape=q.shape)
    check_same("v", v, "q", q, shape=q.shape)
    check_tensor("prompt_k", prompt_k, ndim=4 if bank else (3, 4))
    check_tensor("prompt_v", prompt_v, ndim=4 if bank else (3, 4))
    P = prompt_k.shape[-2]
    lead = (max(1, prompt_k.shape[0]), H) if bank else (H,) if prompt_k.dim() == 3 else (B, H)
    check_same("prompt_k", prompt_k, "q", q, shape=(*lead, P, D))
    check_same("prompt_v", prompt_v, "prompt_k", prompt_k, shape=prompt_k.shape)
    if P < 1:
        raise ValueError(f"prompt_k: expected at least one prompt (P >= 1), got {describe(prompt_k)}")
    return B, H, N, P, D


def check_pool_config(name_prefix, pool_cls, pool_img, topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                      num_prefix_tokens, num_tokens):
    """Validate pool sizes / top-k / prompt lengths / prefix count (name_prefix: '' or 'scores ')."""
    for name, value, lo, hi in (
        ("topk_cls", topk_cls, 1, pool_cls),
        ("topk_img", topk_img, 1, pool_img),
        ("prompt_len_cls", prompt_len_cls, 1, None),
        ("prompt_len_img", prompt_len_img, 1, None),
        ("num_prefix_tokens", num_prefix_tokens, 0, num_tokens),
    ):
        check_int(name, value, lo, hi)
    if pool_cls + pool_img > MAX_POOL_ENTRIES:
        raise ValueError(f"{name_prefix}pool sizes: expected pool_cls + pool_img <= {MAX_POOL_ENTRIES} (one "
                         f"64-bit selection word per token), got {pool_cls} + {pool_img}")


def validate_match_inputs(x, keys_cls, keys_img, bank=False):
    """x [B, N, C], keys [pool >= 1, C] each (``bank``: [T, pool, C], T >= 1 key sets, the same T for both)."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    for name, keys in (("keys_cls", keys_cls), ("keys_img", keys_img)):
        check_tensor(name, keys, ndim=3 if bank else 2, dtypes=FLOAT_DTYPES)
        lead = (max(1, keys_cls.shape[0]),) if bank else ()
        if keys.device != x.device or keys.shape[:-2] != lead or keys.shape[-1] != x.shape[2] or keys.shape[-2] < 1:
            sets = f"{lead[0]}, " if bank else ""
            raise ValueError(f"{name}: expected shape ({sets}pool >= 1, {x.shape[2]}) on {x.device}, got "
                             f"{describe(keys)}")
    check_same("keys_img", keys_img, "keys_cls", keys_cls)


def check_flag(name: str, value) -> bool:
    """A bool argument: True/False only (``"False"`` or 0 would read as a different truth value)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """An int argument in [lo, hi] (hi None: no upper bound); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
        raise ValueError(f"{name}: expected {bound}, got {value!r} ({type(value).__name__})")
    return value


def check_number(name: str, value, *, lo: float, hi: float, hi_open: bool = True, lo_open: bool = False) -> float:
    """A finite real number (int or float, not bool) in the interval [lo, hi) / (lo, hi] as the flags say."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r} ({type(value).__name__})")
    return float(value)
