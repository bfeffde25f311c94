"""Validation of user input for the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, range or option) with a message that names the argument, what came
and what is allowed. Checks run before any computation.
"""

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value) -> torch.Tensor:
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {value.dtype}"
        )
    return value


def check_int_tensor(name: str, value) -> torch.Tensor:
    check_tensor(name, value)
    if value.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], described_as: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({described_as}), got {tuple(value.shape)}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    left = "-inf" if low is None else f"{low}"
    right = "inf" if high is None else f"{high}"
    opening, closing = "(" if low_open or low is None else "[", ")" if high_open or high is None else "]"
    return f"{opening}{left}, {right}{closing}"


def shown(value) -> str:
    """A value as a message shows it: its repr, but an int of more than 30 digits as its order of magnitude (Python
    refuses to print ints of over 4300 digits)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or abs(value) < 10**30:
        return repr(value)
    return f"{'-' if value < 0 else ''}an int of about 10**{int(abs(int(value)).bit_length() * math.log10(2))}"


def check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in [low, high] (or open ends where asked): a Python or NumPy real, or a one-element
    real tensor (read with one host sync). Returns it as a float; a Python int beyond float's range is refused
    like infinity."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a tensor of dtype "
                            f"{value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        check_has_data(**{name: value})
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    interval = _interval(low, high, low_open, high_open)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be a finite number in {interval}, got {shown(int(value))}, beyond float's "
                         "range") from None
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        raise ValueError(f"{name} must be a finite number in {interval}, got {number}")
    return number


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer in [low, high]: a Python or NumPy integer (not bool), or a one-element integer tensor (read
    with one host sync). Returns it as an int."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in INT_DTYPES or value.numel() != 1:
            raise TypeError(f"{name} must be an int or a one-element integer tensor, got a tensor of dtype "
                            f"{value.dtype} and shape {tuple(value.shape)}")
        check_has_data(**{name: value})
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be an int in {interval}, got {shown(value)}")
    return value


def check_has_data(**tensors: Optional[torch.Tensor]) -> None:
    """Tensors on the meta device have no values to compute with."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no data; move it to a real device "
                             "(cpu or cuda) first")


def check_hidden_masked(hidden: torch.Tensor, hidden_masked) -> None:
    """The masked pass's hidden states (optional): hidden's shape and dtype."""
    if hidden_masked is not None:
        check_float_tensor("hidden_masked", hidden_masked)
        check_shape("hidden_masked", hidden_masked, hidden.shape, "the shape of hidden")
        if hidden_masked.dtype != hidden.dtype:
            raise TypeError(f"hidden_masked must have hidden's dtype {hidden.dtype}, got {hidden_masked.dtype}")


def check_head(hidden: torch.Tensor, weight, bias) -> None:
    """The LM head: weight (V, D) matching hidden's last dim and dtype, bias (V,)."""
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float_tensor("bias", bias)
        check_shape("bias", bias, (weight.shape[0],), "V, the vocabulary size of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")


def check_bias_values(bias: Optional[torch.Tensor], finite=None) -> None:
    """A bias holds only finite numbers. A token that can never be drawn takes a bias far below the other logits
    (papo-train's sampling bias is -1e4): its probability is then exactly 0 in float32 while every statistic stays
    finite, where -inf would make the entropies and the KL NaN (0 x -inf). ``finite`` is
    ``torch.isfinite(bias).all()`` when the caller has read it already (in its one host transfer)."""
    if bias is None or bias.numel() == 0:
        return
    if finite is None:
        finite = bool(torch.isfinite(bias).all())
    if not finite:
        index = int((~torch.isfinite(bias)).nonzero()[0, 0])
        raise ValueError(f"bias must hold finite numbers, got {bias[index].item()} at id {index}; for a token that "
                         "can never be drawn give a bias far below the other logits (say -1e4): its probability is "
                         "then exactly 0 and the statistics stay finite")


def check_token_range(name: str, tokens: torch.Tensor, vocab_size: int) -> None:
    """Ids in [0, V). One host sync: the only one on the way in, paid for a clear error."""
    if tokens.numel() == 0:
        return
    low, high = torch.aminmax(tokens.reshape(-1))
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must hold ids in [0, {vocab_size}) (the vocabulary of weight), got id {bad}")


def check_linear_inputs(hidden, weight, tokens, bias, temperature, hidden_masked=None, tokens_name="tokens",
                        check_ids=True) -> float:
    """All checks of the LM-head ops; returns the temperature as a float. ``check_ids=False`` leaves the ids'
    range to the caller (a vocabulary-parallel head checks them against the vocabulary of all its ranks)."""
    check_float_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-dim tensor")
    check_hidden_masked(hidden, hidden_masked)
    check_head(hidden, weight, bias)
    check_int_tensor(tokens_name, tokens)
    check_shape(tokens_name, tokens, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, hidden_masked=hidden_masked, weight=weight, bias=bias, **{tokens_name: tokens})
    check_has_data(hidden=hidden)
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    if check_ids:
        check_token_range(tokens_name, tokens, weight.shape[0])
    check_bias_values(bias)
    return temperature


def check_completion_values(completion_ids: torch.Tensor, completion_mask: torch.Tensor, vocab_size: int,
                            max_completion_length: Optional[int], bias: Optional[torch.Tensor] = None) -> None:
    """The checks of papo_loss that read values, in one host transfer: completion_mask holds only 0 and 1 (or is
    bool), ids are in [0, V) where the mask is on, no response is longer than ``max_completion_length``, and the
    bias is finite (``check_bias_values``)."""
    if completion_ids.numel() == 0:
        check_bias_values(bias)
        return
    on = completion_mask != 0
    binary = torch.ones((), dtype=torch.bool, device=on.device) if completion_mask.dtype == torch.bool \
        else ((completion_mask == 0) | (completion_mask == 1)).all()
    low, high = torch.aminmax(completion_ids.where(on, 0).reshape(-1))
    longest = on.sum(-1).max()
    finite = torch.isfinite(bias).all() if bias is not None and bias.numel() else binary.new_ones(())
    binary, low, high, longest, finite = torch.stack(
        [binary.long(), low.long(), high.long(), longest.long(), finite.long()]).tolist()
    if not binary:
        bad = completion_mask[(completion_mask != 0) & (completion_mask != 1)].reshape(-1)[0].item()
        raise ValueError(f"completion_mask must be bool or hold only 0 and 1 (1 for response tokens), got {bad}")
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"completion_ids must hold ids in [0, {vocab_size}) (the vocabulary of weight) where "
                         f"completion_mask is on, got id {bad}")
    if max_completion_length is not None and longest > max_completion_length:
        raise ValueError(f"max_completion_length must be at least the longest response ({longest} tokens in "
                         f"completion_mask), got {max_completion_length}")
    check_bias_values(bias, finite=bool(finite))
