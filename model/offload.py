"""Block offload: K DiT blocks' frozen tensors live in (pinned) host memory and are streamed to the device
just ahead of their use, in the forward and in the backward, so only a few of them are on the device at once.

    offload = BlockOffload(dit, dit.blocks, count=K, device="cuda")   # the last K blocks go to the host

K is at most N - 1: block 0's input never needs a gradient (it comes from the frozen patchify), and then
PyTorch cannot tell when a module's backward ends, so block 0 stays on the device.

The schedule is driven by PyTorch's own module hooks, nothing is monkeypatched:

    dit forward pre-hook         a pass starts: its uses are blocks 0..N-1, then N-1..0 when grad is on
                                 (the backward); leftovers of the last pass are evicted, the first
                                 `ahead` offloaded blocks are prefetched (overlapping patchify/time MLP)
    block forward pre-hook(i)    use i: wait for block i's copy; prefetch the next `ahead` offloaded uses
    block forward hook(i)        evict i, unless it is among those next uses (the last block, backward next)
    block backward pre-hook(i)   use i in the backward: the same as the forward pre-hook; under gradient
                                 checkpointing this fires before block i's recompute, whose forward hooks
                                 then only check that i is resident
    block backward hook(i)       evict i

A copy is `host.to(device, non_blocking=True)` on a side CUDA stream, with an event the compute stream
waits on and `record_stream` so the caching allocator reuses the memory only after the compute that read
it. Eviction drops the device copy (the host copy is the master: the base is frozen, nothing is copied
back), and points the tensor at a one-element NaN placeholder on the device expanded to its shape: shape,
dtype and device stay what code expects (LoRA adapters added later land on the device), and a use of an
evicted block could not pass unnoticed (NaN everywhere). Tensors are swapped through `.data`, so what
autograd saved (parameters are saved by reference) sees the device copy again when the backward runs.

Without CUDA the same schedule runs with host and device both the CPU (a copy is a clone): that is what
the tests check (bit-identical outputs and gradients, the hook order, how many blocks are resident), and
it saves no memory. Resident at once: the block in use plus `ahead` prefetched ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

# Offloaded tensor -> its host copy, for code that reads weights outside a forward (host_copy).
_HOST = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def host_copy(t: Tensor) -> Tensor:
    """`t`'s values wherever they live: the host copy of an offloaded tensor (its own storage on the device
    is a NaN placeholder while evicted), else `t` itself."""
    return _HOST.get(t, t)


@dataclass
class _Slot:
    """One offloaded block: its tensors, their host copies, and the device copies while resident."""

    tensors: list[Tensor]
    host: list[Tensor]
    device: list[Tensor] | None = None
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after the copies (CUDA)
    waited: bool = False
    placeholders: list[Tensor] = field(default_factory=list)


class BlockOffload:
    """Keep the last `count` of `blocks` on the host and stream each to `device` ahead of its use."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, count: int, device: torch.device | str, *,
                 ahead: int = 1, pin: bool | None = None) -> None:
        n = len(blocks)
        if not 0 <= count < n:
            raise ValueError(f"--offload-blocks {count}: the model has {n} blocks and the first stays on "
                             "the device (nothing upstream of it needs a gradient, so its backward's end "
                             f"cannot be seen); choose 0..{n - 1}")
        if ahead < 1:
            raise ValueError(f"offload prefetch distance must be >= 1, got {ahead}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n, self.ahead = n, ahead
        self.offloaded = frozenset(range(n - count, n))
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        pin = self.cuda if pin is None else pin
        self.slots = {i: self._offload(blocks[i], pin) for i in sorted(self.offloaded)}
        self.uses: list[int] = []
        self.backward = False
        self.log: list[tuple[str, int]] = []  # ("load" | "wait" | "evict", block): the schedule, for tests
        self.max_resident = 0
        self.grad_in: dict[int, bool] = {}  # did an offloaded block's last forward have an input needing grad
        self.handles = [model.register_forward_pre_hook(lambda m, a: self._start())]
        for i, block in enumerate(blocks):
            self.handles += [
                block.register_forward_pre_hook(lambda m, a, i=i: self._forward_use(i, a)),
                block.register_forward_hook(lambda m, a, o, i=i: self._forward_done(i)),
            ]
            if i > 0:  # block 0's backward comes last: nothing to prefetch after it (its input needs no grad)
                pre = block.register_full_backward_pre_hook(lambda m, g, i=i: self._use(self._bwd(i)))
                self.handles.append(pre)
            if i in self.offloaded:  # the end of its backward: when the gradients of its inputs are done
                post = block.register_full_backward_hook(lambda m, gi, go, i=i: self._bwd_done(i))
                self.handles.append(post)

    # -- placement ---------------------------------------------------------------------------------

    def _offload(self, block: nn.Module, pin: bool) -> _Slot:
        """Host copies of the block's parameters and buffers (those it holds now: adapters added later
        stay on the device), each tensor pointed at its placeholder."""
        seen: dict[int, Tensor] = {}
        for t in (*block.parameters(), *block.buffers()):
            if t.is_floating_point():
                seen.setdefault(id(t), t)
        tensors = list(seen.values())
        host = [t.detach().to("cpu") for t in tensors]  # on the CPU already: its storage, no copy
        host = [h.pin_memory() if pin else h for h in host]
        slot = _Slot(tensors, host)
        slot.placeholders = [self._placeholder(t) for t in tensors]
        for t, h, p in zip(tensors, host, slot.placeholders, strict=True):
            t.data = p
            _HOST[t] = h
        return slot

    def _placeholder(self, t: Tensor) -> Tensor:
        return torch.full((1,), float("nan"), device=self.device).to(t.dtype).expand(t.shape)

    def resident(self) -> list[int]:
        return sorted(i for i, s in self.slots.items() if s.device is not None)

    def _load(self, i: int) -> None:
        """Start block i's copy to the device (no wait)."""
        slot = self.slots[i]
        if slot.device is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                slot.device = [h.to(self.device, non_blocking=True) for h in slot.host]
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.stream)
        else:
            slot.device = [h.clone() for h in slot.host]
        slot.waited = False
        self.log.append(("load", i))
        self.max_resident = max(self.max_resident, len(self.resident()))

    def _ensure(self, i: int) -> None:
        """Block i resident and its copy complete before the compute stream reads it."""
        if i not in self.slots:
            return
        self._load(i)
        slot = self.slots[i]
        if slot.waited:
            return
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.ready)
            for d in slot.device:
                d.record_stream(compute)  # allocated on the copy stream, read on this one
        for t, d in zip(slot.tensors, slot.device, strict=True):
            t.data = d
        slot.waited = True
        self.log.append(("wait", i))

    def _evict(self, i: int) -> None:
        slot = self.slots.get(i)
        if slot is None or slot.device is None:
            return
        for t, p in zip(slot.tensors, slot.placeholders, strict=True):
            t.data = p
        slot.device, slot.ready, slot.waited = None, None, False
        self.log.append(("evict", i))

    # -- the schedule ------------------------------------------------------------------------------

    def _start(self) -> None:
        """A new pass of the model: its uses, leftovers evicted, the first offloaded uses prefetched."""
        order = list(range(self.n))
        self.uses = order + order[::-1] if torch.is_grad_enabled() else order
        self.backward = False
        first = self._window(-1)
        for i in self.resident():
            if i not in first:
                self._evict(i)
        for i in first:
            self._load(i)

    def _bwd(self, i: int) -> int:
        """Position of block i's backward use in `uses`."""
        self.backward = True
        return 2 * self.n - 1 - i

    def _window(self, pos: int) -> list[int]:
        """The next `ahead` offloaded blocks used after position `pos`."""
        nxt = dict.fromkeys(i for i in self.uses[pos + 1:] if i in self.offloaded)
        return list(nxt)[: self.ahead]

    def _use(self, pos: int) -> None:
        if not 0 <= pos < len(self.uses):  # a use outside the planned pass (e.g. a second backward)
            return
        self._ensure(self.uses[pos])
        for i in self._window(pos):
            self._load(i)

    def _done(self, pos: int) -> None:
        if 0 <= pos < len(self.uses) and self.uses[pos] not in self._window(pos):
            self._evict(self.uses[pos])

    def _forward_use(self, i: int, args: tuple) -> None:
        if self.backward:  # gradient checkpointing's recompute: the backward pre-hook loaded it
            self._ensure(i)
            return
        self.grad_in[i] = any(isinstance(a, Tensor) and a.requires_grad for a in args)
        self._use(i)

    def _bwd_done(self, i: int) -> None:
        # With no input needing a gradient PyTorch fires this hook when the block's backward STARTS:
        # keep the block then (the next pass evicts it).
        if self.grad_in.get(i, False):
            self._done(self._bwd(i))

    def _forward_done(self, i: int) -> None:
        if not self.backward:
            self._done(i)

    def remove(self) -> None:
        """Bring every offloaded block back onto the device for good and drop the hooks."""
        for h in self.handles:
            h.remove()
        for slot in self.slots.values():
            for t, h in zip(slot.tensors, slot.host, strict=True):
                t.data = h.to(self.device)
                _HOST.pop(t, None)
        self.slots.clear()


__all__ = ["BlockOffload", "host_copy"]
