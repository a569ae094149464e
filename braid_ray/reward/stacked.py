"""M reward networks as one stacked computation: grouped convolutions and batched matmuls.

Member m owns slice m of every parameter, so its forward and its gradients never touch another member's:
training M members costs close to one, and a member's weights do not depend on which other members it
was trained beside (the reward ensemble relies on this to give the same members for any worker count).

Optional per-member architecture diversity (kernel width, activation) uses fixed masks and mixing
weights, so the members stay one computation. A kernel width of 1 makes a member an MLP over positions.

Two member types share this bookkeeping: ``StackedNet`` (CNNs over one-hot sequences, ``StackSpec``) and
``StackedMLP`` (MLPs over vectors such as CLIP image embeddings, ``MLPSpec``); ``build_stack`` picks one
from the spec, so training, the bonus and checkpoints are the same code for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = (F.relu, F.gelu, F.silu, torch.tanh)


@dataclass(frozen=True)
class StackSpec:
    """Shape of every member; ``diverse`` varies kernel width and activation member by member."""

    length: int
    channels: int = 64
    layers: int = 2
    kernel_size: int = 5  # the widest kernel (odd); diverse members use 1, 3, ... up to it
    hidden: int = 128
    pool: int = 1
    diverse: bool = False
    spectral_norm: bool = False  # bound each layer's spectral norm by 1 (distance-aware features)


def member_architecture(spec: StackSpec, member: int) -> tuple[int, int]:
    """(kernel width, activation index) of member ``member``: a function of the member id only."""
    if not spec.diverse:
        return spec.kernel_size, 0
    widths = list(range(1, spec.kernel_size + 1, 2))
    return widths[member % len(widths)], (member // len(widths)) % len(ACTIVATIONS)


def _normalise(w: torch.Tensor, u: torch.Tensor, training: bool) -> torch.Tensor:
    """w (M, out, in) / max(1, sigma_max(w)) per member, by one power-iteration step on u (M, out)."""
    if training:
        with torch.no_grad():
            v = F.normalize(torch.einsum("moi,mo->mi", w, u), dim=-1)
            u.copy_(F.normalize(torch.einsum("moi,mi->mo", w, v), dim=-1))
    v = F.normalize(torch.einsum("moi,mo->mi", w, u), dim=-1).detach()
    sigma = torch.einsum("mo,moi,mi->m", u, w, v)
    return w / sigma.clamp(min=1.0)[:, None, None]


class _Stacked(nn.Module):
    """What every stack of M independent members shares: member ids, per-member state, reassembly."""

    spec: StackSpec | MLPSpec
    members: list[int]

    @staticmethod
    def _uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> torch.Tensor:
        bound = 1.0 / fan_in**0.5  # torch's default Linear/Conv init
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    @property
    def size(self) -> int:
        return len(self.members)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, phi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """The parameters and buffers of the i-th member of this stack (no leading member dimension)."""
        return {k: v[i].detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_members(cls, spec, members: list[int], states: list[dict[str, torch.Tensor]]):
        net = cls(spec, members, seed=0)
        net.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
        return net


class StackedNet(_Stacked):
    """M members over (soft) one-hot sequences.

    ``forward(x)``: x (M, B, L, 4), member m scoring its own batch, or (B, L, 4) scored by every member
    -> (M, B). ``features(x)`` -> phi (M, B, hidden), the last hidden layer.
    """

    def __init__(self, spec: StackSpec, members: list[int], seed: int):
        super().__init__()
        self.spec, self.members = spec, list(members)
        c, k = spec.channels, spec.kernel_size
        assert k % 2 == 1, "kernel_size must be odd"
        convs, masks, acts = [], [], []
        length = spec.length
        for layer in range(spec.layers):
            convs.append((4 if layer == 0 else c, c))
            if spec.pool > 1 and length // spec.pool >= k:
                length //= spec.pool
        for member in members:
            width, act = member_architecture(spec, member)
            mask = torch.zeros(k)
            mask[(k - width) // 2:(k + width) // 2] = 1.0
            masks.append(mask)
            acts.append(F.one_hot(torch.tensor(act), len(ACTIVATIONS)).float())
        self.register_buffer("kernel_mask", torch.stack(masks)[:, None, None, :])  # (M, 1, 1, K)
        self.register_buffer("act_mix", torch.stack(acts))  # (M, A)
        self.flat_length = length
        dims = [(c * length, spec.hidden), (spec.hidden, spec.hidden), (spec.hidden, 1)]
        # Each member's initial weights (and power-iteration vectors) come from its own generator,
        # seeded by (seed, member id), never from its position in the stack.
        shapes = ([(co, ci, k) for ci, co in convs] + [(co,) for ci, co in convs]
                  + [(i, o) for i, o in dims] + [(o,) for i, o in dims])
        fans = [ci * k for ci, co in convs] * 2 + [i for i, o in dims] * 2
        u_dims = [co for ci, co in convs] + [o for i, o in dims[:2]]
        per_member, u_vecs = [], []
        for member in members:
            g = torch.Generator().manual_seed(seed * 100_003 + member)
            per_member.append([self._uniform(sh, fan, g) for sh, fan in zip(shapes, fans)])
            u_vecs.append([F.normalize(torch.randn(d, generator=g), dim=0) for d in u_dims])
        stacked = [nn.Parameter(torch.stack([p[j] for p in per_member])) for j in range(len(shapes))]
        n = len(convs)
        self.conv_w = nn.ParameterList(stacked[:n])
        self.conv_b = nn.ParameterList(stacked[n:2 * n])
        self.dense_w = nn.ParameterList(stacked[2 * n:2 * n + 3])
        self.dense_b = nn.ParameterList(stacked[2 * n + 3:])
        if spec.spectral_norm:
            names = [f"u_conv{j}" for j in range(n)] + ["u_dense0", "u_dense1"]
            for j, name in enumerate(names):
                self.register_buffer(name, torch.stack([u[j] for u in u_vecs]))

    def _act(self, h: torch.Tensor, member_dim: int) -> torch.Tensor:
        if not self.spec.diverse:
            return F.relu(h)
        shape = [1] * h.dim()
        shape[member_dim] = self.size
        return sum(f(h) * self.act_mix[:, a].reshape(shape) for a, f in enumerate(ACTIVATIONS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m, spec = self.size, self.spec
        if x.dim() == 3:
            x = x.unsqueeze(0).expand(m, *x.shape)
        if x.shape[0] != m or x.shape[2:] != (spec.length, 4):
            raise ValueError(f"expected (M={m}, B, {spec.length}, 4) or (B, {spec.length}, 4), got {tuple(x.shape)}")
        b = x.shape[1]
        h = x.permute(1, 0, 3, 2).reshape(b, m * 4, spec.length)  # (B, M*4, L): member-major channels
        length = spec.length
        for j, (w, bias) in enumerate(zip(self.conv_w, self.conv_b)):
            w = w * self.kernel_mask
            if spec.spectral_norm:
                w = _normalise(w.flatten(2), getattr(self, f"u_conv{j}"), self.training).view_as(w)
            h = F.conv1d(h, w.flatten(0, 1), bias.flatten(), padding=spec.kernel_size // 2, groups=m)
            h = self._act(h.view(b, m, -1, length), 1).view(b, -1, length)
            if spec.pool > 1 and length // spec.pool >= spec.kernel_size:
                h = F.max_pool1d(h, spec.pool)
                length //= spec.pool
        h = h.view(b, m, -1).transpose(0, 1)  # (M, B, C*L')
        for j in range(2):
            w = self.dense_w[j]
            if spec.spectral_norm:
                w = _normalise(w.transpose(1, 2), getattr(self, f"u_dense{j}"), self.training).transpose(1, 2)
            h = self._act(torch.baddbmm(self.dense_b[j][:, None, :], h, w), 0)
        return h

    def head(self, phi: torch.Tensor) -> torch.Tensor:
        """phi (M, B, hidden) -> (M, B)."""
        return torch.baddbmm(self.dense_b[2][:, None, :], phi, self.dense_w[2]).squeeze(-1)


@dataclass(frozen=True)
class MLPSpec:
    """Shape of every member of a stack of MLPs over vectors (e.g. L2-normalised CLIP image embeddings)."""

    dim: int  # input dimension D
    hidden: int = 128  # width of every hidden layer = feature dimension d of the bonus
    layers: int = 2  # hidden layers (>= 1); the last one is phi
    spectral_norm: bool = False  # bound each hidden layer's spectral norm by 1 (distance-aware features)


class StackedMLP(_Stacked):
    """M MLP members over vectors, as batched matmuls.

    ``forward(x)``: x (M, B, D), member m scoring its own batch, or (B, D) scored by every member -> (M, B).
    ``features(x)`` -> phi (M, B, hidden), the last hidden layer (ReLU).
    """

    def __init__(self, spec: MLPSpec, members: list[int], seed: int):
        super().__init__()
        if spec.layers < 1:
            raise ValueError(f"MLPSpec.layers: got {spec.layers}, expected >= 1 hidden layer")
        self.spec, self.members = spec, list(members)
        dims = [(spec.dim, spec.hidden)] + [(spec.hidden, spec.hidden)] * (spec.layers - 1) + [(spec.hidden, 1)]
        weights, biases, u_vecs = [], [], []
        for member in members:  # seeded by (seed, member id), as for StackedNet
            g = torch.Generator().manual_seed(seed * 100_003 + member)
            weights.append([self._uniform((i, o), i, g) for i, o in dims])
            biases.append([self._uniform((o,), i, g) for i, o in dims])
            u_vecs.append([F.normalize(torch.randn(o, generator=g), dim=0) for _, o in dims[:-1]])
        self.dense_w = nn.ParameterList(nn.Parameter(torch.stack([w[j] for w in weights])) for j in range(len(dims)))
        self.dense_b = nn.ParameterList(nn.Parameter(torch.stack([b[j] for b in biases])) for j in range(len(dims)))
        if spec.spectral_norm:
            for j in range(len(dims) - 1):
                self.register_buffer(f"u_dense{j}", torch.stack([u[j] for u in u_vecs]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m, spec = self.size, self.spec
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(m, *x.shape)
        if x.dim() != 3 or x.shape[0] != m or x.shape[2] != spec.dim:
            raise ValueError(f"expected (M={m}, B, {spec.dim}) or (B, {spec.dim}), got {tuple(x.shape)}")
        h = x
        for j in range(len(self.dense_w) - 1):
            w = self.dense_w[j]
            if spec.spectral_norm:
                w = _normalise(w.transpose(1, 2), getattr(self, f"u_dense{j}"), self.training).transpose(1, 2)
            h = F.relu(torch.baddbmm(self.dense_b[j][:, None, :], h, w))
        return h

    def head(self, phi: torch.Tensor) -> torch.Tensor:
        """phi (M, B, hidden) -> (M, B)."""
        return torch.baddbmm(self.dense_b[-1][:, None, :], phi, self.dense_w[-1]).squeeze(-1)


# member type name -> (spec class, stack class); the name is stored in reward checkpoints
STACKS: dict[str, tuple[type, type[_Stacked]]] = {"cnn": (StackSpec, StackedNet), "mlp": (MLPSpec, StackedMLP)}


def spec_kind(spec: StackSpec | MLPSpec) -> str:
    for kind, (spec_cls, _) in STACKS.items():
        if isinstance(spec, spec_cls):
            return kind
    raise ValueError(f"unknown member spec {type(spec).__name__}; valid: {[c.__name__ for c, _ in STACKS.values()]}")


def build_stack(spec: StackSpec | MLPSpec, members: list[int], seed: int) -> _Stacked:
    """The stack class that matches ``spec`` (CNN members for StackSpec, MLP members for MLPSpec)."""
    return STACKS[spec_kind(spec)][1](spec, members, seed)
