"""Truncation filters for sampled rows: each takes scaled logits [R, V] and a value per row [R, 1]
and returns the mask [R, V] of the tokens it removes (each docstring says what it keeps).

Every filter removes by a threshold value, never by sorted position, so tied tokens are kept or
dropped together and no result depends on how a sort orders ties. The one exception is a top_p
that leaves a single token: that is greedy, so it keeps the token argmax picks (the lowest id
among ties); top_k=1 and min_p=1 rows never get here (SamplingBatch runs them as greedy rows).

Full sorts of the vocabulary (over 100 ms for 32 x 49152 on 2 cores) are avoided: the top-p and
typical-p sets are found in growing top-k prefixes, which give exactly the values a full sort would
start with.
"""

from __future__ import annotations

import torch

_FIRST_PREFIX = 64


def top_k(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose logit is at least the k-th largest (TGI/HF: ties at the k-th kept)."""
    kth = x.topk(int(k.max())).values.gather(1, k - 1)
    return x < kth


def top_p(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (the token reaching it kept).
    Where the most likely token reaches p alone, only it is kept, the lowest id among tied ones as
    argmax takes it: a top_p that leaves one token is exactly greedy."""
    probs = x.softmax(-1)
    removed = probs < _mass_threshold(probs, probs, p)
    alone = (probs.amax(-1, keepdim=True) >= p).squeeze(1).nonzero().squeeze(1)
    if alone.numel():
        only_argmax = torch.ones_like(removed[alone])
        only_argmax.scatter_(1, x[alone].argmax(-1, keepdim=True), False)
        removed[alone] = only_argmax
    return removed


def typical_p(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022, as in HF/TGI): keep the tokens whose
    surprisal is closest to the entropy until their probability reaches `mass`."""
    logp, probs = x.log_softmax(-1), x.softmax(-1)  # not logp.exp(): slow on -inf
    # nansum(p * log p) as HF, but as the last cumsum element: sum() splits long rows across
    # threads when the batch is small, so its last bit would depend on the batch size.
    entropy = -(probs * logp).nan_to_num_(0.0).cumsum_(-1)[:, -1:]
    closeness = -(logp + entropy).abs()  # -|surprisal - entropy|
    return closeness < _mass_threshold(closeness, probs, mass)


def min_p(x: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens at least min_p times as likely as the most likely one."""
    return x < x.amax(-1, keepdim=True) + log_min_p


def _mass_threshold(key: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per row [R, 1]: taking tokens by descending key, the key of the first token at which their
    probability reaches `mass`. Keeping key >= threshold keeps that smallest set (and its ties)."""
    threshold = torch.empty_like(mass)
    pending = torch.arange(key.shape[0], device=key.device)
    width = _FIRST_PREFIX
    while pending.numel():
        width = min(width, key.shape[1])
        subset = len(pending) < len(key)
        top, ids = (key.index_select(0, pending) if subset else key).topk(width)
        rows_probs = probs.index_select(0, pending) if subset else probs
        cumulative = rows_probs.gather(1, ids).cumsum(-1)
        target = mass[pending]
        done = (cumulative[:, -1:] >= target).squeeze(1) | (width == key.shape[1])
        last = (cumulative < target).sum(-1, keepdim=True).clamp(max=width - 1)
        threshold[pending[done]] = top.gather(1, last)[done]
        pending = pending[~done]
        width *= 8
    return threshold
