"""Every implementation the benchmarks compare, built on one shared setup.

``make_inputs`` is the one setup: the speed runs, the memory runs and every
implementation get the same tensors. An implementation turns ``(op, inputs)``
into a forward callable that returns a tuple of differentiable tensors, always
in the same order for one op:

- ``logprobs``: (log-probs, entropy) of the clean pass;
- ``perception_kl``: (log-probs, masked log-probs, entropy, masked entropy, KL(p || q));
- ``papo_loss``: (the PAPO loss,) with exact entropies and exact KL, gradient through both passes.

Modes: ``forward`` builds the outputs and their autograd graph, ``backward``
runs the backward of those outputs with fixed cotangents, ``full`` does both.
Each implementation declares what it computes fused, what it needs an extra
plain-PyTorch call for, and which ops or modes it cannot run.
"""

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

import papo_kernels

OPS = ("logprobs", "perception_kl", "papo_loss")
MODES = ("forward", "backward", "full")
OUTPUTS = {"logprobs": 2, "perception_kl": 5, "papo_loss": 1}

TEMPERATURE = 1.0
SEQUENCE_LENGTH = 512  # papo_loss sees the N tokens as (N / T, T) responses of T tokens
# PAPO-D's published setting with both PAPO terms exact and dual clip off (no peer has it).
PAPO_LOSS_CONFIG = dict(epsilon_low=0.2, epsilon_high=0.28, dual_clip=None, beta=0.0, gamma=0.01,
                        perception_kl="exact", eta_clean=0.03, eta_masked=0.03, entropy="exact", loss_type="dapo")

Outputs = Tuple[Tensor, ...]
Forward = Callable[[], Outputs]


@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    v: int


@dataclass
class Inputs:
    """The tensors of one case: flat (N, D) views for the ops, (B, T, D) views for papo_loss."""

    hidden: Tensor
    hidden_masked: Tensor
    weight: Tensor
    tokens: Tensor
    mask: Tensor
    advantages: Tensor
    cotangents: Dict[str, Outputs]

    @property
    def batch_shape(self) -> Tuple[int, int]:
        return tuple(self.mask.shape)

    def batched(self, flat: Tensor) -> Tensor:
        return flat.view(*self.batch_shape, *flat.shape[1:])

    def leaves(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.hidden, self.hidden_masked, self.weight

    def zero_grad(self) -> None:
        for leaf in self.leaves():
            leaf.grad = None


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Inputs of one case, the same for every implementation and every mode.

    Logits come out with a standard deviation near 1 (weight scaled by D^-1/2);
    the masked pass is the clean one plus noise, so the KL is small but not zero.
    The LM head and both hidden states require grad, as in full fine-tuning.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    hidden = normal(shape.n, shape.d)
    hidden_masked = (hidden.float() + normal(shape.n, shape.d, scale=0.5).float()).to(dtype)
    weight = normal(shape.v, shape.d, scale=shape.d ** -0.5)
    tokens = torch.randint(shape.v, (shape.n,), generator=generator, device=device)
    sequence_length = min(shape.n, SEQUENCE_LENGTH)
    if shape.n % sequence_length:
        raise ValueError(f"N must be a multiple of {SEQUENCE_LENGTH} (or at most {SEQUENCE_LENGTH}), got {shape.n}")
    batch_shape = (shape.n // sequence_length, sequence_length)
    mask = torch.ones(batch_shape, device=device)
    advantages = torch.randn(batch_shape[0], generator=generator, device=device)
    cotangents = {
        op: tuple(torch.randn(shape.n, generator=generator, device=device) for _ in range(count))
        for op, count in OUTPUTS.items() if op != "papo_loss"
    }
    cotangents["papo_loss"] = (torch.ones((), device=device),)
    return Inputs(hidden.requires_grad_(), hidden_masked.requires_grad_(), weight.requires_grad_(), tokens, mask,
                  advantages, cotangents)


def backward(op: str, inputs: Inputs, outputs: Outputs) -> None:
    """The backward of one forward's outputs, with the case's fixed cotangents."""
    torch.autograd.backward(outputs, inputs.cotangents[op])


# Plain PyTorch as users write it: full logits, log_softmax, gather, entropy, KL.

def naive_log_softmax(hidden: Tensor, weight: Tensor) -> Tensor:
    return torch.log_softmax((hidden @ weight.T).float() / TEMPERATURE, dim=-1)


def naive_gather(log_p: Tensor, tokens: Tensor) -> Tensor:
    return log_p.gather(-1, tokens[:, None]).squeeze(-1)


def naive_entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def naive_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def naive_entropies_and_kl(hidden: Tensor, hidden_masked: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The extra call a peer without fused entropy or KL needs: H, H~ and KL(p || q) from full logits."""
    log_p, log_q = naive_log_softmax(hidden, weight), naive_log_softmax(hidden_masked, weight)
    return naive_entropy(log_p), naive_entropy(log_q), naive_kl(log_p, log_q)


def policy_loss(logprobs: Tensor, advantages: Tensor) -> Tensor:
    """PPO's clipped surrogate per token, on-policy (r = exp(l - l.detach()))."""
    ratio = torch.exp(logprobs - logprobs.detach())
    low, high = 1.0 - PAPO_LOSS_CONFIG["epsilon_low"], 1.0 + PAPO_LOSS_CONFIG["epsilon_high"]
    advantages = advantages[:, None]
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(low, high))


def papo_terms(entropy: Tensor, entropy_masked: Tensor, kl: Tensor) -> Tensor:
    """-gamma KL + eta H + eta H~ per token."""
    config = PAPO_LOSS_CONFIG
    return -config["gamma"] * kl + config["eta_clean"] * entropy + config["eta_masked"] * entropy_masked


def token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    return (per_token * mask).sum() / mask.sum()


# Builders: (op, inputs) -> forward callable.

def package_builder(backend: str) -> Callable[[str, Inputs], Forward]:
    def build(op: str, x: Inputs) -> Forward:
        if op == "logprobs":
            return lambda: tuple(papo_kernels.linear_logprobs(
                x.hidden, x.weight, x.tokens, temperature=TEMPERATURE, backend=backend))
        if op == "perception_kl":
            return lambda: tuple(papo_kernels.linear_perception_kl(
                x.hidden, x.hidden_masked, x.weight, x.tokens, temperature=TEMPERATURE, backend=backend))
        return lambda: (papo_kernels.papo_loss(
            x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
            hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, backend=backend,
            **PAPO_LOSS_CONFIG)[0],)
    return build


def build_naive(op: str, x: Inputs) -> Forward:
    def logprobs() -> Outputs:
        log_p = naive_log_softmax(x.hidden, x.weight)
        return naive_gather(log_p, x.tokens), naive_entropy(log_p)

    def perception_kl() -> Outputs:
        log_p, log_q = naive_log_softmax(x.hidden, x.weight), naive_log_softmax(x.hidden_masked, x.weight)
        return (naive_gather(log_p, x.tokens), naive_gather(log_q, x.tokens), naive_entropy(log_p),
                naive_entropy(log_q), naive_kl(log_p, log_q))

    def papo_loss() -> Outputs:
        logprobs, _, entropy, entropy_masked, kl = (x.batched(t) for t in perception_kl())
        per_token = policy_loss(logprobs, x.advantages) + papo_terms(entropy, entropy_masked, kl)
        return (token_mean(per_token, x.mask),)

    return {"logprobs": logprobs, "perception_kl": perception_kl, "papo_loss": papo_loss}[op]


def build_liger(op: str, x: Inputs) -> Forward:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cross_entropy = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def logprobs_of(hidden: Tensor) -> Tensor:
        return -cross_entropy(x.weight, hidden, x.tokens)

    if op == "logprobs":
        return lambda: (logprobs_of(x.hidden), naive_entropy(naive_log_softmax(x.hidden, x.weight)))
    if op == "perception_kl":
        return lambda: (logprobs_of(x.hidden), logprobs_of(x.hidden_masked),
                        *naive_entropies_and_kl(x.hidden, x.hidden_masked, x.weight))

    grpo = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, epsilon_low=PAPO_LOSS_CONFIG["epsilon_low"],
        epsilon_high=PAPO_LOSS_CONFIG["epsilon_high"], loss_type="dapo", temperature=TEMPERATURE,
        compiled=x.hidden.is_cuda)

    def papo_loss() -> Outputs:
        policy, _ = grpo(x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages)
        terms = papo_terms(*naive_entropies_and_kl(x.hidden, x.hidden_masked, x.weight))
        return (policy + token_mean(x.batched(terms), x.mask),)

    return papo_loss


def build_cut_cross_entropy(op: str, x: Inputs) -> Forward:
    from cut_cross_entropy import linear_cross_entropy

    def logprobs_of(hidden: Tensor) -> Tensor:
        return -linear_cross_entropy(hidden, x.weight, x.tokens, reduction="none")

    if op == "logprobs":
        return lambda: (logprobs_of(x.hidden), naive_entropy(naive_log_softmax(x.hidden, x.weight)))
    if op == "perception_kl":
        return lambda: (logprobs_of(x.hidden), logprobs_of(x.hidden_masked),
                        *naive_entropies_and_kl(x.hidden, x.hidden_masked, x.weight))

    def papo_loss() -> Outputs:
        logprobs = x.batched(logprobs_of(x.hidden))
        terms = papo_terms(*naive_entropies_and_kl(x.hidden, x.hidden_masked, x.weight))
        return (token_mean(policy_loss(logprobs, x.advantages) + x.batched(terms), x.mask),)

    return papo_loss


@dataclass(frozen=True)
class Implementation:
    """One implementation and what it can and cannot compute."""

    name: str
    computes: str
    build: Callable[[str, Inputs], Forward]
    module: Optional[str] = None  # the package it needs, from the optional extra `bench`
    triton_ops: FrozenSet[str] = frozenset()  # ops that run Triton kernels
    gradient_in_forward: FrozenSet[str] = frozenset()  # ops whose forward already computes the gradients

    def skip_reason(self, op: str, mode: str, device: torch.device, interpreter_shape: bool) -> Optional[str]:
        """Why this case cannot run here, or None when it can."""
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return f"{self.module} not installed (pip install 'papo-kernels[bench]')"
        if mode != "full" and op in self.gradient_in_forward:
            return "its forward computes the gradients too: only the full mode is comparable"
        if device.type == "cpu" and op in self.triton_ops and not interpreter_shape:
            return "Triton kernels: on CPU only under TRITON_INTERPRET=1, run at the interpreter shape only"
        return None

    def interpreted(self, op: str, device: torch.device) -> bool:
        return device.type == "cpu" and op in self.triton_ops


PACKAGE_DESCRIPTIONS = {
    "reference": "all three ops, exact; materialises the fp32 N x V logits of each pass (the package's reference)",
    "torch": "all three ops, exact; chunked plain PyTorch with bounded temporaries, never the N x V logits",
    "triton": "all three ops, exact; fused Triton kernels recomputing logits tile by tile",
}


def implementations() -> List[Implementation]:
    """This package's backends as listed in papo_kernels.BACKENDS (without "auto"), then the peers."""
    package = [
        Implementation(
            name=f"papo_kernels.{backend}",
            computes=PACKAGE_DESCRIPTIONS.get(backend, f"all three ops (papo_kernels backend {backend!r})"),
            build=package_builder(backend),
            triton_ops=frozenset(OPS) if backend == "triton" else frozenset(),
        )
        for backend in papo_kernels.BACKENDS if backend != "auto"
    ]
    peers = [
        Implementation(
            name="naive_torch",
            computes="all three ops as users write them: logits = h @ W.T in the input dtype, .float(), "
                     "log_softmax, gather, entropy, KL; materialises several N x V tensors per pass",
            build=build_naive,
        ),
        Implementation(
            name="liger_kernel",
            computes="log-probs: LigerFusedLinearCrossEntropyLoss(reduction='none'); papo_loss policy term: "
                     "LigerFusedLinearGRPOLoss (chunked, gradients computed in forward); no fused exact entropy, "
                     "no per-token KL with gradient through both passes (LigerFusedLinearJSD gives a batch mean, "
                     "gradient to one side): those come from an extra full-logits PyTorch call",
            build=build_liger,
            module="liger_kernel",
            triton_ops=frozenset({"logprobs", "perception_kl"}),
            gradient_in_forward=frozenset({"papo_loss"}),
        ),
        Implementation(
            name="cut_cross_entropy",
            computes="log-probs: linear_cross_entropy(reduction='none'), default gradient filtering "
                     "(filter_eps='high'), no temperature argument (tau = 1 here); no entropy, no KL: those come "
                     "from an extra full-logits PyTorch call",
            build=build_cut_cross_entropy,
            module="cut_cross_entropy",
            triton_ops=frozenset(OPS),
        ),
    ]
    return package + peers
