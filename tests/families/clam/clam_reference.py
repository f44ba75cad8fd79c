"""An independent reference of CLAM's module tree and forward, for interop tests (no plugin code).

Built from the paper's equations with the module names CLAM's code uses, in
its current layout (FC block ``Linear, ReLU, Dropout`` then the attention
block at ``attention_net.3``) and its older one (no ``Dropout`` module in the
FC block when dropout is off: attention at ``attention_net.2``). Plain
attention is ``module = Linear, Tanh, [Dropout], Linear``; gated attention is
``attention_a = Linear, Tanh, [Dropout]``, ``attention_b = Linear, Sigmoid,
[Dropout]``, ``attention_c = Linear``. Dropout is on or off as in CLAM.
"""

from __future__ import annotations

import torch
from torch import nn


class _Plain(nn.Module):
    def __init__(self, L: int, D: int, K: int, dropout: bool) -> None:
        super().__init__()
        layers = [nn.Linear(L, D), nn.Tanh()] + ([nn.Dropout(0.25)] if dropout else []) + [nn.Linear(D, K)]
        self.module = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x), x


class _Gated(nn.Module):
    def __init__(self, L: int, D: int, K: int, dropout: bool) -> None:
        super().__init__()
        extra = [nn.Dropout(0.25)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), *extra)
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), *[nn.Dropout(0.25) for _ in extra])
        self.attention_c = nn.Linear(D, K)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class _SvmLossBuffers(nn.Module):
    """What the smooth SVM loss leaves in a CLAM state dict: a ``labels`` buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("labels", torch.arange(2))


class ReferenceClam(nn.Module):
    """CLAM-SB (``mb=False``) or CLAM-MB with CLAM's weight names; ``forward(h) -> (logits, probs, A)``."""

    def __init__(
        self,
        n_classes: int = 2,
        mb: bool = False,
        gate: bool = True,
        L: int = 512,
        D: int = 256,
        embed_dim: int = 1024,
        dropout: bool = True,
        legacy_fc: bool = False,
        svm_loss: bool = False,
    ) -> None:
        super().__init__()
        fc = [nn.Linear(embed_dim, L), nn.ReLU()]
        if dropout or not legacy_fc:
            fc.append(nn.Dropout(0.25 if dropout else 0.0))
        K = n_classes if mb else 1
        fc.append((_Gated if gate else _Plain)(L, D, K, dropout))
        self.attention_net = nn.Sequential(*fc)
        if mb:
            self.classifiers = nn.ModuleList(nn.Linear(L, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.Linear(L, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(L, 2) for _ in range(n_classes))
        if svm_loss:
            self.instance_loss_fn = _SvmLossBuffers()
        self.mb, self.n_classes = mb, n_classes

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A, h = self.attention_net(h)
        A_raw = A.transpose(1, 0)  # K x N
        A = torch.exp(A_raw - A_raw.max(dim=1, keepdim=True).values)
        A = A / A.sum(dim=1, keepdim=True)  # a_k = exp(s_k) / sum_j exp(s_j), over the patches
        M = A @ h  # slide representation(s): sum_k a_k h_k
        if self.mb:
            logits = torch.stack([self.classifiers[c](M[c])[0] for c in range(self.n_classes)])[None]
        else:
            logits = self.classifiers(M)
        probs = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
        return logits, probs, A_raw
