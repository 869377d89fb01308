"""A membership-inference attack on the global student: what does the model reveal about
who trained it, and how much does differential privacy reduce that?

Loss-threshold attack (Yeom et al., 2018): an interaction the model was trained on tends to
get a lower loss than one it never saw, so an attacker who can query the model guesses
"member" when the loss is below a threshold. Its power over every threshold is the AUC of
the loss as a member-vs-non-member score, computed here by the Mann-Whitney rank statistic
(ties count one half). 0.5 = the model reveals nothing this attack can use.

Members and non-members, one of each per edge user, at adjacent positions of the same
history so that the two differ in whether the model trained on them and as little as
possible in anything else (history length, time): the member is the user's last training
interaction (``s[-3]`` predicted from ``s[:-3]``), a target of the device's local training
whenever it was selected; the non-member is the held-out test interaction (``s[-1]`` from
``s[:-1]``), never trained on and never looked at by model selection. The item one step
later is a little harder to predict even for a model that memorised nothing (drift), so the
attack's AUC on a student that never saw the edge users (``protocol = proxy``) is the
reference for "nothing revealed", not exactly 0.5; docs/privacy.md reports it.

The attack reads edge users' data, so it runs in the experimenter's process after the
simulation (:func:`simulations.runner.run_experiment`), never in the server or on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedkd.samples import left_pad


def rank_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties one half."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, np.float64)
    sorted_scores = scores[order]
    # average ranks (1-based) over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


@torch.no_grad()
def target_losses(model: nn.Module, histories: np.ndarray, targets: np.ndarray, *,
                  batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy of each target given its history over all items (no masking: the
    attacker queries the model as it is), and the target's rank (1 = top)."""
    model.eval()
    losses, ranks = [], []
    for i in range(0, len(histories), batch_size):
        h = torch.as_tensor(histories[i:i + batch_size])  # (B, L)
        t = torch.as_tensor(targets[i:i + batch_size])  # (B,)
        scores = model(h)[:, 1:]  # (B, N): item ids 1..N; padding is not a candidate
        logp = torch.log_softmax(scores.float(), dim=1)
        tl = logp.gather(1, (t - 1).unsqueeze(1)).squeeze(1)  # (B,)
        losses.append((-tl).numpy())
        ranks.append((scores > scores.gather(1, (t - 1).unsqueeze(1))).sum(1).numpy() + 1)
    return np.concatenate(losses), np.concatenate(ranks)


def attack_samples(sequences: Sequence[np.ndarray], users: Sequence[int], max_len: int):
    """(member histories, member targets, non-member histories, non-member targets) for the
    users whose training part has at least two items (so the member has a history)."""
    mh, mt, nh, nt = [], [], [], []
    for u in users:
        s = np.asarray(sequences[u])
        if len(s) < 4:
            continue
        mh.append(left_pad(s[:-3], max_len))
        mt.append(s[-3])
        nh.append(left_pad(s[:-1], max_len))
        nt.append(s[-1])
    as_arr = lambda xs, shape: np.stack(xs) if xs else np.zeros(shape, np.int64)  # noqa: E731
    return (as_arr(mh, (0, max_len)), np.asarray(mt, np.int64), as_arr(nh, (0, max_len)), np.asarray(nt, np.int64))


def membership_attack(model: nn.Module, sequences: Sequence[np.ndarray], users: Sequence[int], max_len: int) -> dict:
    """Loss- and rank-threshold attack AUCs on ``users`` (one member, one non-member each)."""
    mh, mt, nh, nt = attack_samples(sequences, users, max_len)
    ml, mr = target_losses(model, mh, mt)
    nl, nr = target_losses(model, nh, nt)
    return {"auc_loss": rank_auc(-ml, -nl), "auc_rank": rank_auc(-mr, -nr), "members": int(len(mt)),
            "non_members": int(len(nt)), "member_loss_mean": float(ml.mean()) if ml.size else float("nan"),
            "non_member_loss_mean": float(nl.mean()) if nl.size else float("nan")}
