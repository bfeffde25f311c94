"""The README's usage example: the PAPO loss of a random batch, both passes with gradient."""

import torch

import papo_kernels

torch.manual_seed(0)
batch, length, dim, vocab = 4, 32, 64, 1000
head = torch.nn.Linear(dim, vocab, bias=False)
hidden = torch.randn(batch, length, dim, requires_grad=True)  # final hidden states, clean image
hidden_masked = torch.randn(batch, length, dim, requires_grad=True)  # the same positions, masked image
completion_ids = torch.randint(0, vocab, (batch, length))
completion_mask = torch.ones(batch, length)
completion_mask[:, 24:] = 0  # padding after the answer
advantages = torch.randn(batch)

loss, metrics = papo_kernels.papo_loss(
    hidden, head.weight, completion_ids, completion_mask, advantages,
    hidden_masked=hidden_masked, **papo_kernels.PRESETS["papo_d"],
)
loss.backward()
print(f"loss {loss.item():.4f}")
for name, value in metrics.items():
    print(f"  {name:20s} {value.item():.4f}")
