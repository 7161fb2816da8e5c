"""Code a user writes against fastaccum's public API, type-checked (never run) by
tests/test_typing.py. Each ``reveal_type`` line names the type mypy must infer; the test
reads them from mypy's output."""

import torch
from typing_extensions import reveal_type

import fastaccum
from fastaccum.integrations import FastaccumTrainer

model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
x = torch.randn(2, 4)

opt = fastaccum.wrap(
    torch.optim.AdamW(model.parameters(), lr=3e-4), accum_steps=8, model=model, max_grad_norm=1.0
)
reveal_type(opt)  # fastaccum.optim.wrapper.AccumulatingOptimizer
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
opt.backward(model(x).sum(), num_items=x.shape[0])
reveal_type(opt.step(num_items=3))  # bool
opt.zero_grad()
reveal_type(opt.flush())  # bool
reveal_type(opt.accum_steps)  # int
opt.accum_steps *= 2
reveal_type(opt.micro_step)  # int
stats = opt.stats()
opt.load_state_dict(opt.state_dict())
listed = fastaccum.wrap([torch.optim.SGD(model.parameters()), torch.optim.AdamW([])], 4)

fused = fastaccum.optim.AdamW(model.parameters(), lr=1e-3, accum_steps=4, model=model)
reveal_type(fused)  # fastaccum.optim.fused.AdamW
sgd = fastaccum.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, accum_steps=4)

reveal_type(fastaccum.fuse_wgrad(model))  # torch.nn.modules.container.Sequential
model = fastaccum.convert_batchnorm(model, mode="window")
layer = fastaccum.nn.Linear(4, 3)

policy = fastaccum.ActivationPolicy(bits=8)
with fastaccum.save_activations(policy):
    y = model(x)
y = fastaccum.checkpoint(model, x)
saved = fastaccum.memory.saved_bytes(model, x, policy=policy)
reveal_type(saved.total)  # int

plan = fastaccum.plan_batch(model, lambda n: torch.randn(n, 4), 512, optimizer=opt)
reveal_type(plan)  # fastaccum.memory.planner.BatchPlan
reveal_type(plan.accum_steps)  # int
reveal_type(fastaccum.scale_lr(3e-4, base_batch=256, new_batch=512, rule="sqrt"))  # float
warm = fastaccum.warmup(opt, 100, after=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10))

accums = [torch.zeros_like(p) for p in model.parameters()]
grads = [torch.ones_like(p) for p in model.parameters()]
res = fastaccum.accumulate_(accums, grads, scale=2.0, zero_grads=True)
reveal_type(res.accum_sumsq)  # torch._tensor.Tensor
fastaccum.finalize_(accums, grads, 0.5, factor_tensor=res.accum_sumsq)

trainer_class: type = FastaccumTrainer
