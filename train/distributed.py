"""Data-parallel personalization over several processes: torchrun, FSDP2 over the frozen base and adapter.

    torchrun --nproc-per-node N -m setseq personalize ...      (one machine; NCCL on CUDA, gloo on the CPU)

Why one rank's step equals the one-process step: every rank draws the SAME global batch from the same
seeded generators (items, caption dropout, token masks, flow times, noise, self-conditioning coins, and
the LoRA dropout masks from torch's global RNG), then runs the DiT on its own share of it (`share`). Each
share's loss keeps the global batch's item weights, and FSDP sums (not averages) the shares' gradients,
so the summed gradient is the one-process gradient up to the order of float additions. The token
embeddings are replicated (small, outside the DiT): their gradients are all-reduced here.

The DiT is sharded with `fully_shard`, each block then the root (frozen base weights and LoRA factors
alike), so a rank holds 1/N of the DiT plus the one block it is running. Rank 0 alone reads the DiT, into
host memory (load_base's `dit_on_host`); the other ranks build it on the meta device (`dit_on_meta`), so a
machine holds one host copy, not one per process. What reads it whole runs first, on rank 0, its answers
sent to all (`from_main`); `fully_shard` moves each unit to the device, each rank's shards are filled from
rank 0's tensors (`fill_from_main`), and only then are the caches built, every rank sampling the prior
set together (`base_only`, `SharedCache`), so no device ever holds the whole DiT. Rank 0 alone logs,
previews to disk and writes the concept file; checkpoints are `torch.distributed.checkpoint` folders
written by all ranks together (train/checkpoint_dcp.py), readable at any world size, or by one plain
process.

Without torchrun (no RANK / WORLD_SIZE in the environment) none of this runs: `current()` is None.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lora.inject import concept_adapters, lora_layers
from lora.layers import ConceptAdapter
from lora.tokens import AddedTokens

from .checkpoint import Checkpoint, prune_checkpoints
from .checkpoint_dcp import dcp_checkpoint_path, save_dcp_checkpoint
from .config import PersonalizeConfig, require
from .data import LatentCache
from .resume import adapter_state, start_stage
from .stage_data import Batch
from .step import AdapterGrowth, StepOut

_BYTES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}  # gloo: as uint8


def launched() -> bool:
    """Whether torchrun (or another env:// launcher) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun: join the launcher's process group (NCCL on CUDA, gloo on the CPU) and pin this rank's
    GPU, before anything is put on a device; leave it at the end. Nothing when not launched by torchrun.

    A run every rank completed leaves through a barrier: gloo's waits for every earlier operation of the
    group, so no rank tears its connections down while a peer's last collective is in flight (a rank of a
    2-process CPU test run aborted at exit twice, rarely and not reproduced: 'terminate called without an
    active exception'). After an error, no barrier: the other ranks may never reach it (torchrun ends
    them)."""
    if not launched() or dist.is_initialized():
        yield
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


@dataclass
class World:
    """This process's place in a data-parallel run."""

    rank: int
    size: int
    mesh: DeviceMesh

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: int) -> slice:
        """This rank's items of a global batch: contiguous, sizes differing by at most one."""
        base, extra = divmod(batch, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))



def is_main_process() -> bool:
    """Whether this process logs and writes: rank 0 of a process group, or a process without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def from_main(compute: Callable[[], object]) -> object:
    """Rank 0's `compute()` on every rank (all ranks enter): what reads the whole DiT, which only rank 0's
    host holds (the others' is on the meta device until `shard` fills it). A small picklable value."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current(device: str = "cpu") -> World | None:
    """The run's World when a process group is up (see `init`), else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    kind = torch.device(device).type
    return World(dist.get_rank(), dist.get_world_size(), init_device_mesh(kind, (dist.get_world_size(),)))


def check(cfg: PersonalizeConfig, world: World, dit: nn.Module | None = None) -> None:
    require(cfg.batch_size >= world.size,
            f"batch_size {cfg.batch_size} is smaller than the {world.size} processes; every process needs at "
            f"least one item of each batch: raise --batch-size or launch fewer (--nproc-per-node)")
    # A two-expert base sends each item to the expert its time serves: with both experts trained, the
    # ranks would run different experts, and a sharded expert needs every rank to run it.
    require(getattr(dit, "boundary", None) is None or cfg.expert != "both",
            "several processes train one expert of a two-expert base at a time: pass --expert high, then "
            "--expert low (or run both experts in one process)")


def per_device(cfg: PersonalizeConfig, world: World) -> PersonalizeConfig:
    """The config one device's memory check sees: on CUDA the largest share of the batch (each GPU holds
    its own activations; the same on every rank, so all refuse or none); on the CPU the whole batch (the
    ranks share the machine's memory)."""
    if torch.device(cfg.device).type != "cuda":
        return cfg
    own = copy.copy(cfg)  # not dataclasses.replace: a share may be smaller than prior_per_batch allows
    own.batch_size = -(-cfg.batch_size // world.size)
    return own


# ----------------------------------------------------------------------------------------- the model


def shard(dit: nn.Module, world: World) -> None:
    """FSDP2 over the DiT (each expert's, for a two-expert base): each block its own unit (gathered just
    before it runs), then the rest of that DiT, then the whole as the root. Only rank 0 holds the DiT's
    values (in host memory, adapter included); the others' is on the meta device: every rank's shards are
    then filled from rank 0's tensors (`fill_from_main`), so one machine holds one host copy, not N."""
    whole = dit.state_dict() if world.main else {}  # kept alive until the others have their shards
    nets = [m for m in dit.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]
    for net in nets:
        for block in net.blocks:
            fully_shard(block, mesh=world.mesh)
        if net is not dit:
            fully_shard(net, mesh=world.mesh)
    fully_shard(dit, mesh=world.mesh)
    for m in dit.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum the shares' gradients: each share's loss is weighted
            m.set_force_sum_reduction_for_comms(True)  # ... by the global batch (gloo has no PREMUL_SUM)
    if any(t.is_meta for t in [*dit.parameters(), *dit.buffers()]):
        dit.to_empty(device=world.mesh.device_type)  # this rank's shards, allocated and not yet filled
    fill_from_main(dit, whole)


@torch.no_grad()
def fill_from_main(dit: nn.Module, whole: dict[str, Tensor]) -> None:
    """Every parameter's shard and every buffer from rank 0's whole tensors (`whole`, its state dict taken
    before sharding; {} on the other ranks), one tensor at a time: rank 0 broadcasts it, each rank keeps
    its own rows. torch's set_model_state_dict(broadcast_from_rank0=True) does the same, but gloo cannot
    broadcast float8 (fp8 base weights), which travel here as their bytes. Rank 0 rewrites its own shards
    with the values they hold."""
    own = dict(dit.named_parameters()) | dict(dit.named_buffers())  # the same order on every rank
    for name, target in own.items():
        local = target.to_local() if isinstance(target, DTensor) else target
        if dist.get_rank() == 0:  # a non-persistent buffer (no state dict holds it) as rank 0 has it
            full = whole.get(name, local).to(local.device)
        else:
            full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
        dist.broadcast(full.view(torch.uint8) if full.dtype in _BYTES else full, src=0)
        if isinstance(target, DTensor):  # this rank's rows as FSDP2 cut them (src_data_rank=None: no comms)
            mesh, placements = target.device_mesh, target.placements
            full = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
        local.copy_(full)


@contextlib.contextmanager
def full_adapters(dit: nn.Module) -> Iterator[None]:
    """Every adapter tensor as its whole plain tensor while the block runs (all ranks enter: a gather),
    so what reads the module (the concept file) sees the trained LoRA; the shards are back afterwards."""
    held = []
    for adapter in concept_adapters(dit).values():
        for name, p in list(adapter.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                held.append((adapter, name, p))
                adapter._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=False)
    try:
        yield
    finally:
        for adapter, name, p in held:
            adapter._parameters[name] = p


def reshard(dit: nn.Module) -> None:
    """Every FSDP unit back to its shards. FSDP2 keeps the root gathered after a forward until the backward;
    after a forward without one (sampling) its parameters would stay plain tensors, and what then reads or
    flags them (set_stage's requires_grad, the optimizer, a checkpoint) would miss the shards."""
    for m in dit.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def redraw_adapter(dit: nn.Module, concept: str, seed: int, device: str) -> None:
    """A fresh adapter's factors drawn again on `device`, as one process draws them there: under torchrun the
    adapter is injected into the host's DiT (before sharding), and a CUDA generator draws other numbers than
    the CPU's. The same seeding and module order as the injection (train/personalize.py `_add_adapter`); on
    the CPU it draws the same numbers again (so the CPU tests check that order)."""
    torch.manual_seed(seed)
    for a in concept_adapters(dit, concept).values():
        rank, features = a.lora_A1.shape
        fresh = ConceptAdapter(features, a.lora_B1.shape[0], rank, device=device, dtype=a.lora_A1.dtype)
        for name, p in a.named_parameters():
            p.copy_(fresh.get_parameter(name))


@contextlib.contextmanager
def base_only(dit: nn.Module) -> Iterator[None]:
    """The DiT without its adapters while the block runs (the caches sample the base model): each LoRA
    layer's adapters are set aside, so its forward is the base layer's. Under torchrun the adapter is
    injected before sharding, and so before the caches are built.

    FSDP2 initializes itself at the first forward, from the parameters then requiring gradients (their dtype
    is the gradients' reduction dtype): the adapter's, as at the first training step. Afterwards every unit
    is resharded (the root stays gathered after a forward) and the flags restored, so training starts
    from the state it would have had without the caches' forwards."""
    held = [(layer, layer.adapters) for layer in lora_layers(dit).values()]
    flags = [(p, p.requires_grad) for _, adapters in held for p in adapters.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    for layer, _ in held:
        layer.adapters = nn.ModuleDict()
    try:
        yield
    finally:
        for layer, adapters in held:
            layer.adapters = adapters
        reshard(dit)
        for p, flag in flags:
            p.requires_grad_(flag)


class SharedCache(LatentCache):
    """The on-disk caches for several processes: all ranks compute a missing entry together (a sharded DiT's
    forward needs every rank), rank 0 alone writes it, and the others then read rank 0's file, so every
    rank trains on the same bits. Whether an entry exists is rank 0's answer, so all ranks agree."""

    def __init__(self, folder: str | Path, world: World):
        super().__init__(folder)
        self.world = world

    def get(self, name: str, key: dict, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        path = self.path(name, key)
        found = [path.is_file()]
        dist.broadcast_object_list(found, src=0)
        if found[0]:
            return load_file(str(path))
        tensors = compute()
        if self.world.main:
            super().get(name, key, lambda: tensors)  # writes it (nobody else does)
        dist.barrier()
        return tensors if self.world.main else load_file(str(path))


# ------------------------------------------------------------------------------------------ the step


class ShardedGrowth(AdapterGrowth):
    """AdapterGrowth's bound from each rank's shards and ONE all-reduce of the squared norms: the same
    number on every rank (so all stop together). Built before sharding (the base weights' norm is read
    whole, by rank 0). On 2 CPU processes, tiny base (40 layers): 6-11 ms a call, where AdapterGrowth's
    per-layer DTensor ops took 67-72 ms (~0.7 s a step for Wan 14B's ~400 layers); the same bound."""

    def __init__(self, dit: nn.Module, concept: str):
        adapters = concept_adapters(dit, concept)
        self.names = list(adapters)
        self.adapters = [adapters[n] for n in self.names]
        self.base = from_main(lambda: AdapterGrowth(dit, concept).base)  # rank 0's whole base weights

    @torch.no_grad()
    def __call__(self) -> tuple[float, str]:
        if not self.names:
            return 0.0, ""
        local = [torch.stack([(a.lora_B1.to_local() + a.lora_B2.to_local()).float().square().sum(),
                              a.lora_A1.to_local().float().square().sum()]) for a in self.adapters]
        squares = torch.stack(local)  # (layers, 2): this rank's part of ||B1 + B2||^2 and ||A1||^2
        dist.all_reduce(squares)
        bound = squares[:, 0].sqrt() * squares[:, 1].sqrt()
        ratio = torch.nan_to_num(bound.norm() / self.base, nan=float("inf"))
        return float(ratio), self.names[int(torch.nan_to_num(bound, nan=float("inf")).argmax())]


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Sum the replicated parameters' gradients over ranks (FSDP already summed the DiT's), then clip all
    to one global norm, as clip_grad_norm_ does in one process; returns the norm before clipping."""
    sharded = [p for p in params if isinstance(p, DTensor) and p.grad is not None]
    plain = [p for p in params if not isinstance(p, DTensor) and p.grad is not None]
    for p in plain:
        dist.all_reduce(p.grad)
    norms = []
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain], foreach=True))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return float(total)


def gather(out: StepOut, share: slice, batch: int) -> StepOut:
    """The global batch's step output (loss, per-item losses, times, prior flags) on every rank, for the
    log and the NaN check: each rank's share put in place, then summed over ranks."""
    def whole(x: Tensor) -> Tensor:
        full = torch.zeros(batch, dtype=torch.float64, device=x.device)
        full[share] = x.detach().double()
        dist.all_reduce(full)
        return full

    loss = out.loss.detach().clone()
    dist.all_reduce(loss)  # each share's loss is its items' part of the global weighted sum
    shown = Batch(out.batch.x0[:0], whole(out.batch.prompt).long(), whole(out.batch.weight).to(loss.dtype),
                  whole(out.batch.is_prior) > 0.5)
    return StepOut(loss, whole(out.per_sample).to(out.per_sample.dtype), whole(out.t).to(out.t.dtype), shown)


def start_sharded_stage(cfg: PersonalizeConfig, stage: int, optimizer: torch.optim.Optimizer,
                        g: torch.Generator, resume: Checkpoint | None) -> int:
    """resume.start_stage for a sharded optimizer: a checkpoint holds whole tensors (any world size
    wrote it), so each rank keeps its own shard of every restored state; and the CUDA generator restored
    is this rank's own GPU's."""
    cuda = None
    if resume is not None:
        rng = dict(resume.rng)
        cuda = rng.pop("cuda", None)
        resume = dataclasses.replace(resume, rng=rng)
    start = start_stage(cfg, stage, optimizer, g, resume)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0])
    for p, state in optimizer.state.items():
        if isinstance(p, DTensor):
            for key, value in state.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    return start


def save_stage_checkpoint(cfg: PersonalizeConfig, dit: nn.Module, tokens: AddedTokens,
                          optimizer: torch.optim.Optimizer, g: torch.Generator, stage: int, step: int
                          ) -> None:
    """resume.save_stage_checkpoint as a DCP folder: every rank calls it, each writes its own shards."""
    folder = cfg.work / "checkpoints"
    save_dcp_checkpoint(dcp_checkpoint_path(folder, stage, step), stage=stage, step=step,
                        params=adapter_state(cfg, dit, tokens), optimizer=optimizer, generator=g,
                        config=cfg.to_dict())
    if dist.get_rank() == 0:
        prune_checkpoints(folder, cfg.keep_checkpoints)
