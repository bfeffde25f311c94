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

Two logit distributions (``DISTRIBUTIONS``): ``spread`` (logits with a standard
deviation near 1, token entropy near log V, tokens drawn uniformly) and
``peaked``, like a trained model's: the head is scaled so that the mean token
entropy of the clean pass is ``PEAKED_ENTROPY`` nats (calibrated on the inputs
themselves) and the tokens are sampled from the clean distribution, as rollouts are.
"""

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

import papo_kernels
from papo_kernels.fast_path import EPILOGUES, LOW_MEMORY_WORKSPACE_BYTES, resolve_epilogue
from papo_kernels.fast_path.grad_weight import GRAD_WEIGHT_VARIABLE

from . import distributions

OPS = ("logprobs", "perception_kl", "papo_loss")
MODES = ("forward", "backward", "full")
OUTPUTS = {"logprobs": 2, "perception_kl": 5, "papo_loss": 1}

TEMPERATURE = 1.0
TRL_VOCABULARY_CHUNK = 32768  # TRL's GRPOTrainer passes this chunk size (_CHUNKED_LOGPROB_CHUNK_SIZE)
MASKED_LOGIT_NOISE = 0.5  # standard deviation of the masked pass's logits around the clean ones
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
    distribution: str
    description: str  # the distribution and its measured mean token entropy, for the results' note column

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


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0,
                distribution: str = "spread") -> Inputs:
    """Inputs of one case, the same for every implementation and every mode.

    ``spread``: logits with a standard deviation near 1 (weight scaled by D^-1/2), tokens
    uniform. ``peaked``: the same head times a factor calibrated to a mean token entropy of
    ``distributions.PEAKED_ENTROPY`` nats, tokens sampled from the clean pass. Either way
    the masked pass is the clean one plus noise whose logits differ by about
    ``MASKED_LOGIT_NOISE``, so the KL is small but not zero. The LM head and both hidden
    states require grad, as in full fine-tuning.
    """
    if distribution not in distributions.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {list(distributions.DISTRIBUTIONS)}, got {distribution!r}")
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*size, generator=generator, device=device) * scale

    hidden = normal(shape.n, shape.d).to(dtype)
    noise = normal(shape.n, shape.d, scale=MASKED_LOGIT_NOISE)
    weight = normal(shape.v, shape.d, scale=shape.d ** -0.5)
    tokens = torch.randint(shape.v, (shape.n,), generator=generator, device=device)
    scale = 1.0
    if distribution == "peaked":
        scale = distributions.logit_scale_for_entropy(hidden, weight, distributions.PEAKED_ENTROPY)
    # the noise shrinks as the head grows, so the masked logits stay about MASKED_LOGIT_NOISE away
    hidden_masked = (hidden.float() + noise / scale).to(dtype)
    weight = (weight * scale).to(dtype)
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
    entropy = distributions.mean_entropy(hidden, weight)
    description = f"{distribution} logits: mean token entropy {entropy:.3g} nats"
    if distribution == "peaked":
        low, high = distributions.PEAKED_RANGE
        if not low <= entropy <= high:
            raise RuntimeError(f"the peaked inputs' mean token entropy is {entropy:.3g} nats, outside [{low}, {high}]")
        tokens = distributions.sample_tokens(hidden, weight, generator)
        description += f" (head x{scale:.3g}, tokens sampled from p)"
    return Inputs(hidden.requires_grad_(), hidden_masked.requires_grad_(), weight.requires_grad_(), tokens, mask,
                  advantages, cotangents, distribution, description)


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
    """The package's per-token path on ``backend``: the LM-head ops, and papo_loss on top of them."""
    def build(op: str, x: Inputs) -> Forward:
        if op == "logprobs":
            return lambda: tuple(papo_kernels.linear_logprobs(
                x.hidden, x.weight, x.tokens, temperature=TEMPERATURE, backend=backend))
        if op == "perception_kl":
            return lambda: tuple(papo_kernels.linear_perception_kl(
                x.hidden, x.hidden_masked, x.weight, x.tokens, temperature=TEMPERATURE, backend=backend))
        return lambda: (papo_kernels.papo_loss(
            x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
            hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path="per_token", backend=backend,
            **PAPO_LOSS_CONFIG)[0],)
    return build


@contextlib.contextmanager
def grad_weight_flag(kernel: str) -> Iterator[None]:
    """``PAPO_KERNELS_GRAD_WEIGHT`` set to ``kernel`` (the fast path's dW product) for the duration, restored after."""
    previous = os.environ.get(GRAD_WEIGHT_VARIABLE)
    os.environ[GRAD_WEIGHT_VARIABLE] = kernel
    try:
        yield
    finally:
        if previous is None:
            del os.environ[GRAD_WEIGHT_VARIABLE]
        else:
            os.environ[GRAD_WEIGHT_VARIABLE] = previous


def fast_path_builder(epilogue: str, workspace_bytes: Optional[int] = None,
                      grad_weight: str = "addmm") -> Callable[[str, Inputs], Forward]:
    """papo_loss on its fast path with ``epilogue``: the loss and, inside the forward, its gradient; the workspace
    given or the default policy, dW by ``grad_weight``."""
    def build(op: str, x: Inputs) -> Forward:
        if op != "papo_loss":
            raise ValueError(f"the fast path computes papo_loss only, got op {op!r}")

        def forward() -> Outputs:
            with grad_weight_flag(grad_weight):
                return (papo_kernels.papo_loss(
                    x.batched(x.hidden), x.weight, x.batched(x.tokens), x.mask, x.advantages,
                    hidden_masked=x.batched(x.hidden_masked), temperature=TEMPERATURE, path="fast", backend=epilogue,
                    workspace_bytes=workspace_bytes, **PAPO_LOSS_CONFIG)[0],)
        return forward
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


def build_trl(op: str, x: Inputs) -> Forward:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def logprobs_and_entropy(hidden: Tensor) -> Tuple[Tensor, Tensor]:
        logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, x.weight, None, x.tokens, TEMPERATURE, TRL_VOCABULARY_CHUNK, None, 1.0, ("entropy",))
        return logprobs, entropy

    def perception_kl() -> Outputs:
        logprobs, entropy = logprobs_and_entropy(x.hidden)
        logprobs_masked, entropy_masked = logprobs_and_entropy(x.hidden_masked)
        kl = naive_kl(naive_log_softmax(x.hidden, x.weight), naive_log_softmax(x.hidden_masked, x.weight))
        return logprobs, logprobs_masked, entropy, entropy_masked, kl

    def papo_loss() -> Outputs:
        logprobs, _, entropy, entropy_masked, kl = (x.batched(t) for t in perception_kl())
        per_token = policy_loss(logprobs, x.advantages) + papo_terms(entropy, entropy_masked, kl)
        return (token_mean(per_token, x.mask),)

    return {"logprobs": lambda: logprobs_and_entropy(x.hidden), "perception_kl": perception_kl,
            "papo_loss": papo_loss}[op]


@functools.lru_cache(maxsize=None)
def import_failure(module: str) -> Optional[str]:
    """Why ``module`` does not import here, or None when it does."""
    try:
        importlib.import_module(module)
    except Exception as error:  # any failure of a peer's import is a reason to skip it, with its message
        return f"{module} does not import: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return None


def epilogue_unavailable(epilogue: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the fast path cannot use ``epilogue`` for inputs of ``device`` and ``dtype``, or None when it can."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the native epilogue warns when it falls back to torch
            module = resolve_epilogue(epilogue, device, dtype)
    except Exception as error:  # resolve_epilogue's errors say why (wrong device, no triton, build failure)
        return f"epilogue {epilogue!r} unavailable: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if module.NAME != epilogue:
        return f"epilogue {epilogue!r} unavailable here (papo_kernels would fall back to {module.NAME!r})"
    return None


@dataclass(frozen=True)
class Implementation:
    """One implementation and what it can and cannot compute."""

    name: str
    computes: str
    build: Callable[[str, Inputs], Forward]
    module: Optional[str] = None  # the package it needs, from the optional extra `bench`
    imports: Tuple[str, ...] = ()  # modules that must import for it to run (a peer's own needs)
    ops: FrozenSet[str] = frozenset(OPS)  # the ops it computes
    triton_ops: FrozenSet[str] = frozenset()  # ops that run Triton kernels
    gradient_in_forward: FrozenSet[str] = frozenset()  # ops whose forward already computes the gradients
    unavailable: Optional[Callable[[torch.device, torch.dtype], Optional[str]]] = None  # why not on this device

    def skip_reason(self, op: str, mode: str, device: torch.device, dtype: torch.dtype,
                    interpreter_shape: bool) -> Optional[str]:
        """Why this case cannot run here, or None when it can."""
        if op not in self.ops:
            return f"computes {', '.join(sorted(self.ops))} only"
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return f"{self.module} not installed (pip install 'papo-kernels[bench]')"
        for module in self.imports:
            failure = import_failure(module)
            if failure:
                return failure
        if self.unavailable is not None:
            reason = self.unavailable(device, dtype)
            if reason:
                return reason
        if mode != "full" and op in self.gradient_in_forward:
            return "its forward computes the gradients too: only the full mode is comparable"
        if device.type == "cpu" and op in self.triton_ops and not interpreter_shape:
            return "Triton kernels: on CPU only under TRITON_INTERPRET=1, run at the interpreter shape only"
        return None

    def interpreted(self, op: str, device: torch.device) -> bool:
        return device.type == "cpu" and op in self.triton_ops


PACKAGE_DESCRIPTIONS = {
    "reference": "all three ops, exact; materialises the fp32 N x V logits of each pass (the package's reference)",
    "torch": "all three ops, exact; chunked plain PyTorch with bounded temporaries, never the N x V logits; "
             "papo_loss on the per-token path (16 NDV: the backward recomputes the logits)",
    "triton": "all three ops, exact; fused Triton kernels recomputing logits tile by tile; papo_loss on the "
              "per-token path (16 NDV)",
}
EPILOGUE_DESCRIPTIONS = {
    "torch": "plain PyTorch epilogue",
    "triton": "Triton epilogue (two kernels: statistics, then dZ)",
    "native": "native C++ CPU epilogue",
}


# The fast path's settings in the sweep besides its default: (name suffix, workspace bytes, dW kernel, description)
FAST_PATH_VARIANTS = {
    "": (None, "addmm", "the default workspace (min(4 GiB, 10% of free memory) on CUDA, 256 MiB on the CPU)"),
    ".256MiB": (LOW_MEMORY_WORKSPACE_BYTES, "addmm", "the low-memory setting, workspace_bytes = 256 MiB"),
    ".reduce_add": (None, "reduce_add", "dW by the reduce-add kernel (PAPO_KERNELS_GRAD_WEIGHT=reduce_add) and its "
                                        "workspace policy (1024 tokens a chunk, at most min(1 GiB, 10% of free memory))"),
}


def fast_path_implementation(epilogue: str, variant: str = "") -> Implementation:
    workspace_bytes, grad_weight, setting = FAST_PATH_VARIANTS[variant]
    return Implementation(
        name=f"papo_kernels.fast.{epilogue}{variant}",
        computes=f"papo_loss only, exact, on its fast path with the {EPILOGUE_DESCRIPTIONS.get(epilogue, epilogue)}: "
                 "row chunks of logits by the device's library, the gradient computed inside the forward "
                 f"(12 NDV, nothing recomputed), {setting}",
        build=fast_path_builder(epilogue, workspace_bytes, grad_weight),
        ops=frozenset({"papo_loss"}),
        triton_ops=frozenset({"papo_loss"}) if epilogue == "triton" else frozenset(),
        gradient_in_forward=frozenset({"papo_loss"}),
        unavailable=functools.partial(epilogue_unavailable, epilogue),
    )


def implementations() -> List[Implementation]:
    """This package's per-token backends (papo_kernels.BACKENDS without "auto"), its fast path with each
    epilogue (papo_kernels.fast_path.EPILOGUES without "auto") and with the Triton epilogue at its other settings
    (``FAST_PATH_VARIANTS``), then the peers."""
    package = [
        Implementation(
            name=f"papo_kernels.{backend}",
            computes=PACKAGE_DESCRIPTIONS.get(backend, f"all three ops (papo_kernels backend {backend!r})"),
            build=package_builder(backend),
            triton_ops=frozenset(OPS) if backend == "triton" else frozenset(),
        )
        for backend in papo_kernels.BACKENDS if backend != "auto"
    ]
    package += [fast_path_implementation(epilogue) for epilogue in EPILOGUES if epilogue != "auto"]
    package += [fast_path_implementation("triton", variant) for variant in FAST_PATH_VARIANTS if variant]
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
        Implementation(
            name="trl_chunked_logprob",
            computes="log-probs and exact entropy with gradient: trl.kernels.chunked_logprob.ChunkedLogProbFunction "
                     f"(cuBLAS tiles of 4096 tokens x {TRL_VOCABULARY_CHUNK} vocabulary in the input dtype, a Triton "
                     "fold on CUDA, torch ops elsewhere; backward recomputes each tile); one call per pass; no "
                     "KL with gradient through both passes: it comes from an extra full-logits PyTorch call",
            build=build_trl,
            module="trl",
            imports=("trl.kernels.chunked_logprob", "trl.trainer.utils"),
        ),
    ]
    return package + peers
