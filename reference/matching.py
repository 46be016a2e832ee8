"""Reference cosine matching and top-k prompt selection (docs/how-it-works.md, 'Pools and prompts' to 'Matching and
selection').

Tie rule (shared by every backend): among equal scores the lower pool-entry index wins.
"""

import torch


def prompt_entry_index(pool_cls, pool_img, prompt_len_cls, prompt_len_img, device=None):
    """Pool entry owning each prompt token: [P] int64 over the concatenated pools (CLS entries first).

    Prompt token p < pool_cls*prompt_len_cls belongs to CLS entry p // prompt_len_cls; later tokens belong
    to image entry pool_cls + (p - pool_cls*prompt_len_cls) // prompt_len_img.
    """
    cls = torch.arange(pool_cls * prompt_len_cls, device=device) // prompt_len_cls
    img = pool_cls + torch.arange(pool_img * prompt_len_img, device=device) // prompt_len_img
    return torch.cat([cls, img])


def topk_entries(scores, k):
    """Boolean [..., E] marking the top-k of the last axis; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, True)


def match_prompts_ref(
    x, keys_cls, keys_img, *, topk_cls, topk_img, prompt_len_cls=1, prompt_len_img=1, num_prefix_tokens=1
):
    """Cosine matching of every token against its pool's keys.

    x:         [B, N, C]  block input (prefix tokens first)
    keys_cls:  [Pc, C]    keys of the CLS pool, used by the num_prefix_tokens prefix tokens
    keys_img:  [Pi, C]    keys of the image pool, used by the patch tokens
    returns    prompt_mask bool [B, N, Pc*Lc + Pi*Li], matching_loss (scalar)

    matching_loss = mean(1 - s_topk) over prefix tokens + mean(1 - s_topk) over patch tokens
    (a term is 0 when its token group is empty).
    """
    B, N, _ = x.shape
    xn = torch.nn.functional.normalize(x, dim=-1)
    s_cls = xn[:, :num_prefix_tokens] @ torch.nn.functional.normalize(keys_cls, dim=-1).T  # [B, Nc, Pc]
    s_img = xn[:, num_prefix_tokens:] @ torch.nn.functional.normalize(keys_img, dim=-1).T  # [B, Ni, Pi]
    sel_cls, sel_img = topk_entries(s_cls, topk_cls), topk_entries(s_img, topk_img)

    pool_cls, pool_img = keys_cls.shape[0], keys_img.shape[0]
    entry_sel = torch.zeros(B, N, pool_cls + pool_img, dtype=torch.bool, device=x.device)
    entry_sel[:, :num_prefix_tokens, :pool_cls] = sel_cls
    entry_sel[:, num_prefix_tokens:, pool_cls:] = sel_img
    entry = prompt_entry_index(pool_cls, pool_img, prompt_len_cls, prompt_len_img, x.device)
    prompt_mask = entry_sel[:, :, entry]  # [B, N, P]

    loss = x.new_zeros(())
    for s, sel in ((s_cls, sel_cls), (s_img, sel_img)):
        if s.numel():
            loss = loss + (1 - s[sel]).mean()
    return prompt_mask, loss
