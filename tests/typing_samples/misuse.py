"""Calls that break fastaccum's annotations; tests/test_typing.py expects mypy to flag
each line marked ``# error: <code>`` with that code, and nothing else."""

import torch

import fastaccum

model = torch.nn.Linear(4, 4)
fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), "8")  # error: arg-type
fastaccum.optim.AdamW(model.parameters(), accum_steps=2.5)  # error: arg-type
opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 8)
opt.step(num_items="tokens")  # error: arg-type
window: str = opt.micro_step  # error: assignment
fastaccum.fuse_wgrad("model")  # error: type-var
