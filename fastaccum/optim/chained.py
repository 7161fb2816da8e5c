"""``ChainedOptimizer``: several ``torch.optim`` optimizers stepped as one.

Models are often trained with more than one optimizer: ``torch.optim.Muon`` takes only the
2-D hidden weights, so the embeddings, head, norms and biases go to an AdamW beside it.
``fastaccum.wrap([muon, adamw], K)`` builds one of these so that both share one window:
one micro-step count, one ``num_items`` normalization, one clip by the global norm over
every parameter (what ``clip_grad_norm_(model.parameters())`` does in a native loop), one
GradScaler decision (a window with an inf is skipped by all of them), one checkpoint.

The chain holds no parameters or state of its own. ``param_groups`` lists the members'
group dicts themselves, in order, so an LR scheduler on the chain (or on the wrapper)
drives each member's learning rates, and ``state`` reads and writes the members' state.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch


class _MemberStates(MutableMapping):
    """``state`` of a chain: each parameter's entry lives in the state of the member
    optimizer whose param groups hold it (a fresh parameter reads as ``{}``, as from a
    ``torch.optim`` optimizer's defaultdict)."""

    def __init__(self, chain: ChainedOptimizer) -> None:
        self._chain = chain

    def _holding(self, key: object) -> dict | None:
        for opt in self._chain.optimizers:
            if key in opt.state:
                return opt.state
        return None

    def _owner(self, key: object) -> dict:
        for opt in self._chain.optimizers:
            if any(key is p for group in opt.param_groups for p in group["params"]):
                return opt.state
        raise KeyError(key)

    def __getitem__(self, key: object) -> Any:
        held = self._holding(key)
        return (held if held is not None else self._owner(key))[key]

    def __setitem__(self, key: object, value: Any) -> None:
        held = self._holding(key)
        (held if held is not None else self._owner(key))[key] = value

    def __delitem__(self, key: object) -> None:
        held = self._holding(key)
        if held is None:
            raise KeyError(key)
        del held[key]

    def __contains__(self, key: object) -> bool:
        return self._holding(key) is not None

    def __iter__(self) -> Iterator[Any]:
        for opt in self._chain.optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._chain.optimizers)


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` where Python has it (3.11+); on 3.10 the error goes on
    without the note (calling it there would replace the error with an AttributeError)."""
    adder = getattr(err, "add_note", None)
    if adder is not None:
        adder(note)


def _common_defaults(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """The defaults every member shares with equal values (OneCycleLR, for one, looks for
    ``momentum`` or ``betas`` here before it cycles them in every group)."""
    first, *rest = optimizers
    common = {}
    for key, value in first.defaults.items():
        try:
            if all(key in o.defaults and bool(o.defaults[key] == value) for o in rest):
                common[key] = value
        except (RuntimeError, TypeError, ValueError):  # tensors and other ambiguous values
            continue
    return common


def _renumber(
    groups: list[dict[str, Any]], first: int
) -> tuple[dict[Any, int], list[dict[str, Any]]]:
    """State-dict param groups with their parameter keys renumbered from ``first`` in
    order: (old key -> new number, the renumbered groups)."""
    number: dict[Any, int] = {}
    for group in groups:
        for pid in group["params"]:
            number[pid] = first + len(number)
    return number, [{**g, "params": [number[pid] for pid in g["params"]]} for g in groups]


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped, zeroed and checkpointed as one.

    ``fastaccum.wrap`` builds it when given a list of optimizers; it can also be built
    directly and passed to ``wrap``. ``param_groups`` is the members' groups in order (the
    same dicts), ``state`` reaches the members' states, ``step()`` steps each member in
    order, and ``state_dict()`` is one ``torch.optim`` state dict over all of them.

    Args:
        optimizers: two or more ``torch.optim.Optimizer`` (one is allowed too) whose
            parameters do not overlap.

    Raises:
        TypeError: ``optimizers`` is not a sequence of optimizers, or holds a chain.
        ValueError: it is empty, holds the same optimizer twice, or two members share a
            parameter.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if isinstance(optimizers, torch.optim.Optimizer) or not isinstance(
            optimizers, (list, tuple)
        ):
            raise TypeError(
                "optimizers must be a list or tuple of torch.optim optimizers, got "
                f"{type(optimizers).__name__}"
            )
        if not optimizers:
            raise ValueError("optimizers is empty; give at least one torch.optim optimizer")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizers[{i}] must be a torch.optim.Optimizer, got {type(opt).__name__}"
                )
            if isinstance(opt, ChainedOptimizer):
                raise TypeError(
                    f"optimizers[{i}] is itself a ChainedOptimizer; list its members instead"
                )
        owner: dict[int, int] = {}
        for i, opt in enumerate(optimizers):
            if any(opt is other for other in optimizers[:i]):
                raise ValueError(f"optimizers[{i}] appears twice in the list")
            for group in opt.param_groups:
                for p in group["params"]:
                    j = owner.setdefault(id(p), i)
                    if j != i:
                        raise ValueError(
                            f"a parameter of shape {tuple(p.shape)} is in both optimizers[{j}] "
                            f"and optimizers[{i}]; each parameter must have one optimizer"
                        )
        members = list(optimizers)
        groups = [g for opt in members for g in opt.param_groups]
        # Optimizer.__init__ sets up the hook dictionaries; its copies of the groups are
        # left behind once the members are set (param_groups and state read theirs).
        super().__init__(groups, _common_defaults(members))
        self.optimizers = members
        self._member_states = _MemberStates(self)

    # Read through to the members at every access, so that a member's own
    # load_state_dict (which replaces its group and state objects) is seen at once.
    # Before the members are set (Optimizer.__init__), they are the chain's own.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        if "optimizers" not in self.__dict__:
            return self.__dict__["_own_param_groups"]
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if "optimizers" in self.__dict__:
            raise AttributeError(
                "a ChainedOptimizer's param_groups are its members'; set them on a member"
            )
        self.__dict__["_own_param_groups"] = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        if "optimizers" not in self.__dict__:
            return self.__dict__["_own_state"]
        return self._member_states

    @state.setter
    def state(self, value: Any) -> None:
        if "optimizers" in self.__dict__:
            raise AttributeError("a ChainedOptimizer's state is its members'; set it on a member")
        self.__dict__["_own_state"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once built: the chain cannot tell which member a new group belongs to.

        Raises:
            RuntimeError: always, after construction.
        """
        if hasattr(self, "optimizers"):
            raise RuntimeError(
                "a ChainedOptimizer cannot tell which of its optimizers a new param group "
                "belongs to; add it to that optimizer before chaining (or wrapping) it"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Step every member in order; ``closure`` (optional) is evaluated once, first, and
        its loss returned. Member step hooks run as the members' own steps run them."""
        for hook in self._optimizer_step_pre_hooks.values():
            hook(self, (), {})
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        for hook in self._optimizer_step_post_hooks.values():
            hook(self, (), {})
        return loss

    # Each member's step already runs torch's global step hooks; do not run them again.
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Each member's ``zero_grad``."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One ``torch.optim`` state dict over all members: their param groups in order,
        parameters numbered across them (what ``torch.distributed.checkpoint`` expects).

        Raises:
            TypeError: a member's state dict has entries beyond "state" and
                "param_groups", which one flat state dict cannot hold.
        """
        state: dict[Any, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for i, opt in enumerate(self.optimizers):
            member = opt.state_dict()
            extra = set(member) - {"state", "param_groups"}
            if extra:
                raise TypeError(
                    f"optimizers[{i}]'s state dict has entries {sorted(extra)} beyond 'state' "
                    "and 'param_groups'; save each member's state_dict() instead"
                )
            number, renumbered = _renumber(member["param_groups"], offset)
            state.update({number[pid]: value for pid, value in member["state"].items()})
            groups += renumbered
            offset += len(number)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (its groups go back to the members in order), or
        ``{"optimizers": [one torch.optim state dict per member]}``.

        Raises:
            ValueError: neither form, or another number of param groups or optimizers;
                a member's own load error (e.g. another number of parameters). All
                members are left as they were then.
        """
        if isinstance(state_dict, dict) and isinstance(state_dict.get("optimizers"), list):
            members = state_dict["optimizers"]
            if len(members) != len(self.optimizers):
                raise ValueError(
                    f"the state dict holds {len(members)} optimizers' states and this chain "
                    f"has {len(self.optimizers)} optimizers"
                )
        elif isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict):
            members = self._split(state_dict)
        else:
            got = list(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                "not a state dict of this chain (expected 'state' and 'param_groups', or "
                f"'optimizers'), got {got}"
            )
        before = [opt.state_dict() for opt in self.optimizers]
        done = 0
        try:
            for opt, member in zip(self.optimizers, members, strict=True):
                opt.load_state_dict(member)
                done += 1
        except Exception as err:
            # A later member refused its entry: put the earlier ones back as they were.
            for opt, previous in zip(self.optimizers[:done], before, strict=False):
                opt.load_state_dict(previous)
            add_note(
                err,
                f"fastaccum: optimizers[{done}] of the chain refused its state; no "
                "optimizer of the chain was changed",
            )
            raise

    def _split(self, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
        """A flat state dict cut back into one per member, by each member's group count.
        Parameter keys may be numbers or names (torch.distributed.checkpoint's)."""
        counts = [len(opt.param_groups) for opt in self.optimizers]
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != sum(counts):
            raise ValueError(
                f"the state dict holds {len(groups)} param groups and this chain's "
                f"optimizers have {sum(counts)} ({' + '.join(map(str, counts))})"
            )
        members, start = [], 0
        for count in counts:
            mine = groups[start : start + count]
            start += count
            number, renumbered = _renumber(mine, 0)
            members.append(
                {
                    "state": {n: state[pid] for pid, n in number.items() if pid in state},
                    "param_groups": renumbered,
                }
            )
        return members

    def __repr__(self) -> str:
        inner = "".join(f"  {opt!r}".replace("\n", "\n  ") + ",\n" for opt in self.optimizers)
        return f"ChainedOptimizer(\n{inner})"
