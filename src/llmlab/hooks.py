"""Hook points: named places in the forward pass where a tensor can be read or replaced.

The names follow TransformerLens (`hook_embed`, `blocks.0.attn.hook_pattern`, ...), taken from
the module tree, so the module names of `model.py` are public API. Hooks exist only inside a
`with model.hooks(...)` block or a `run_with_cache` call: nothing stays attached by accident.

    with model.hooks(fwd=[("blocks.0.hook_resid_post", fn)]):   # fn(tensor, hook) -> tensor | None
        logits = model(idx)
    logits, cache = model.run_with_cache(idx, names=lambda name: name.endswith("hook_pattern"))

A hook function returning a tensor replaces the activation (activation patching); returning
None leaves it unchanged. Each hooked point hands its hooks a copy of the activation, so a hook may
also edit it in place (`t[:, :, head] = 0`, as TransformerLens users write): the edit flows on,
and nothing else sees it (not a tensor a hook at another point saved, nor what autograd kept;
hooks on the same point share its copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NameFilter = str | Callable[[str], bool]


class HookPoint(nn.Module):
    """The identity function with a name. `name` is its path in the module tree."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    def forward(self, x: Tensor) -> Tensor:
        # Hooked: a copy, which in-place edits may change. x itself may be a view that autograd
        # forbids editing (Q, K, V split from one product; the positions broadcast over the batch),
        # or a tensor that another hook point or the backward pass also holds.
        return x.clone()

    def __call__(self, x: Tensor) -> Tensor:
        # Unhooked, it is the identity without nn.Module's call machinery: about 5 µs a call on
        # this project's CPU, and a decoded token passes ~13 hook points per layer.
        return super().__call__(x) if self.is_hooked() else x

    def is_hooked(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)


class HookedModule(nn.Module):
    """Mixin for a model whose submodules contain `HookPoint`s."""

    def name_hook_points(self) -> None:
        """Call once at the end of `__init__`: gives every hook point its dotted path."""
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}

    def hook_names(self, names: NameFilter | Sequence[str] | None = None) -> list[str]:
        """All hook point names, or those that `names` selects (a name, a list, or a predicate)."""
        points = self.hook_points()
        if names is None:
            return list(points)
        if callable(names):
            return [n for n in points if names(n)]
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in points]
        if unknown:
            raise KeyError(f"no hook point named {unknown[0]!r}; see model.hook_names()")
        return wanted

    @contextmanager
    def hooks(self, fwd: Sequence[tuple[NameFilter, HookFn]]) -> Iterator[HookedModule]:
        """Attach forward hooks for the duration of the block, then remove them, always."""
        points = self.hook_points()
        handles = []
        try:
            for names, fn in fwd:
                for name in self.hook_names(names):
                    handles.append(points[name].register_forward_hook(_adapt(fn)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_cache(
        self, *args: Any, names: NameFilter | Sequence[str] | None = None, **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run forward and return `(logits, {hook name: activation})`, activations detached."""
        cache: dict[str, Tensor] = {}

        def save(x: Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach()

        with self.hooks([(name, save) for name in self.hook_names(names)]):
            logits = self(*args, **kwargs)
        return logits, cache


@contextmanager
def direct_attributes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every submodule and parameter of `model` is also a plain instance
    attribute of its owner, so `self.qkv`, `self.weight`, `self.hook_q` ... are found without
    nn.Module.__getattr__.

    nn.Module keeps submodules and parameters in dicts of its own; Python consults `__getattr__`
    only after the ordinary lookup has failed, which costs about a microsecond, and one decoded
    token of a small model makes ~45 such lookups per layer: a fifth of its time
    (`python -m benchmarks.profile_decode`). The copies are the same objects, so hooks, in-place
    edits and `.data` swaps act on them; they are removed on exit. Assigning a new submodule or
    parameter inside the block is safe too (nn.Module's `__setattr__` drops the copy), but setting
    one to None (`linear.bias = None`) is not seen until the block ends.
    """
    bound = []
    for module in model.modules():
        for name, value in [*module._modules.items(), *module._parameters.items()]:
            if value is not None and name not in module.__dict__:
                module.__dict__[name] = value
                bound.append((module, name))
    try:
        yield model
    finally:
        for module, name in bound:
            module.__dict__.pop(name, None)


def _adapt(fn: HookFn) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
    """torch's forward hook signature (module, inputs, output) → ours (output, hook)."""

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        assert isinstance(module, HookPoint)
        return fn(output, module)

    return hook
