"""The concept file: everything a trained concept is, in one safetensors file.

Tensors:
    {module}.lora_A1 / .lora_B1 / .lora_B2   per targeted layer (module names of our DiT = Wan's)
    token.{text}                             T5 input embedding of each added token, e.g. `token.[v]`
Metadata (strings; JSON where structured):
    format = "setseq-concept", version, name, rank, targets, tokens (their order), prompts,
    train_config, base = {"name", "fingerprint", "weights"}

The base identity says which model the concept belongs to: a name the caller chooses (preset or
checkpoint name), a fingerprint of the architecture (a hash of every base tensor's name and
shape) and a hash of the weights themselves (base_weights_hash: a few values of every tensor, cheap
at any size). apply_concept refuses a concept whose name or architecture differs from the model's.
Other weights of the same architecture get a warning, not a refusal: a LoRA carried over to a
fine-tune of its base is ordinary practice and can work, while a concept trained on other weights
(the random `tiny` preset, then applied to the committed tiny base) should never pass unnoticed.
Concept files written before the weights hash (no "weights" key) load and apply without the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora.inject import (
    LORA_TENSORS,
    concept_state_dict,
    inject_lora,
    load_concept_state_dict,
    remove_concept,
    set_scales,
)
from model.fp8 import FP8_TARGETS
from model.offload import host_copy
from model.safetensors_header import sort_metadata
from model.tempfiles import kill_point, publish, remove_stale, temp_path

FORMAT = "setseq-concept"
VERSION = 1
_TOKEN_PREFIX = "token."


@dataclass(frozen=True)
class BaseIdentity:
    name: str  # preset or checkpoint name, e.g. "wan2.1-1.3b"
    fingerprint: str  # architecture hash, see base_fingerprint()
    # Weights hash, see base_weights_hash(); "" = unknown (files written before it). Not part of equality:
    # other weights of one architecture are a warning (check_base), and concepts of either still combine.
    weights: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint})"


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the names and shapes of the model's own tensors (LoRA tensors and fp8 scales excluded):
    equal for two instances of one architecture whatever their dtype (fp8 included), device or weights."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()  # fp8 scales: a storage detail
              if ".adapters." not in k and not k.endswith(".weight_scale")}
    blob = json.dumps(shapes, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SAMPLES = 64  # values read from each tensor


@torch.no_grad()
def base_weights_hash(model: nn.Module) -> str:
    """Hash of 64 evenly spaced values of each of the model's own tensors (LoRA excluded), rounded to
    bf16 so that one checkpoint loaded in fp32 or bf16 hashes alike: tells two trainings of one
    architecture apart while reading a few kilobytes. "" for a model on the meta device.

    The linears `--base-dtype fp8` may quantize (model/fp8.FP8_TARGETS) are left out, so a concept
    trained on the fp8 load of a checkpoint matches its bf16 load: the norms, embeddings, modulation
    and head they leave still differ between any two trainings."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict(keep_vars=True).items()):  # the tensors themselves: host_copy
        t = host_copy(t)  # an offloaded block's values (its device tensors are placeholders while evicted)
        if ".adapters." in key or not t.is_floating_point() or _fp8_able(key):
            continue
        if t.is_meta:
            return ""
        flat = t.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES].to("cpu", torch.bfloat16)
        h.update(key.encode())
        h.update(picked.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def _fp8_able(key: str) -> bool:
    module = key.rpartition(".")[0]
    return any(re.fullmatch(p, module) for p in FP8_TARGETS)


def base_identity(model: nn.Module, name: str) -> BaseIdentity:
    return BaseIdentity(name=name, fingerprint=base_fingerprint(model), weights=base_weights_hash(model))


@dataclass
class Concept:
    """A trained concept (or several trained jointly, sharing one adapter)."""

    name: str
    lora: dict[str, Tensor]  # "{module}.lora_A1|lora_B1|lora_B2" -> tensor
    targets: tuple[str, ...]  # the patterns it was injected with (informational; layers are exact)
    base: BaseIdentity
    tokens: dict[str, Tensor] = field(default_factory=dict)  # added token text -> input embedding (D,)
    prompts: dict[str, str] = field(default_factory=dict)  # e.g. {"static": ..., "dynamic": ...}
    train_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_lora_tensors(self.lora, where=f"concept {self.name!r}")

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.lora})

    @property
    def rank(self) -> int:
        return self.lora[f"{self.modules[0]}.lora_A1"].shape[0]

    def factors(self, module: str) -> tuple[Tensor, Tensor, Tensor]:
        """(A1 (r, in), B1 (out, r), B2 (out, r)) of one layer."""
        return tuple(self.lora[f"{module}.{t}"] for t in LORA_TENSORS)


def check_lora_tensors(lora: dict[str, Tensor], where: str) -> None:
    """Every layer has A1 (r, in), B1 and B2 (out, r) with one rank r across layers."""
    if not lora:
        raise ValueError(f"{where} holds no LoRA tensors")
    modules: dict[str, set[str]] = {}
    for key in lora:
        module, _, tensor = key.rpartition(".")
        if tensor not in LORA_TENSORS or not module:
            raise ValueError(f"{where}: unexpected LoRA key {key!r}; "
                             "keys are '<module>.lora_A1|lora_B1|lora_B2'")
        modules.setdefault(module, set()).add(tensor)
    ranks = set()
    for module, have in modules.items():
        if have != set(LORA_TENSORS):
            raise ValueError(f"{where}: layer {module} lacks {sorted(set(LORA_TENSORS) - have)}")
        a, b1, b2 = (lora[f"{module}.{t}"] for t in LORA_TENSORS)
        if a.ndim != 2 or b1.ndim != 2 or b1.shape != b2.shape or b1.shape[1] != a.shape[0]:
            raise ValueError(f"{where}: layer {module} has A1 {tuple(a.shape)}, B1 {tuple(b1.shape)}, "
                             f"B2 {tuple(b2.shape)}; expected (r, in), (out, r), (out, r)")
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"{where}: layers have different ranks {sorted(ranks)}")


def concept_from_model(model: nn.Module, name: str, base: BaseIdentity, *, adapter: str | None = None,
                       targets: tuple[str, ...] = (), tokens: dict[str, Tensor] | None = None,
                       prompts: dict[str, str] | None = None, train_config: dict | None = None) -> Concept:
    """Snapshot an injected model's adapter (default: its only one) as a Concept (tensors copied to CPU)."""
    lora = {k: v.detach().to("cpu", copy=True) for k, v in concept_state_dict(model, adapter).items()}
    tokens = {k: v.detach().to("cpu", copy=True) for k, v in (tokens or {}).items()}
    return Concept(name=name, lora=lora, targets=tuple(targets), base=base, tokens=tokens,
                   prompts=dict(prompts or {}), train_config=dict(train_config or {}))


def save_concept(path: str | os.PathLike, concept: Concept) -> None:
    """Write atomically: a temporary file beside `path`, then os.replace."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in concept.lora.items()}
    for text, emb in concept.tokens.items():
        tensors[_TOKEN_PREFIX + text] = emb.detach().contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "name": concept.name,
        "rank": str(concept.rank),
        "targets": json.dumps(list(concept.targets)),
        "tokens": json.dumps(list(concept.tokens)),
        "prompts": json.dumps(concept.prompts),
        "train_config": json.dumps(concept.train_config),
        "base": json.dumps({"name": concept.base.name, "fingerprint": concept.base.fingerprint}
                           | ({"weights": concept.base.weights} if concept.base.weights else {})),
    }
    write_safetensors(path, tensors, metadata)


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)  # a killed earlier write's temporary
    tmp = temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata(tmp)
        kill_point("concept")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_concept(path: str | os.PathLike) -> Concept:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    check_finite(tensors, str(path))
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a setseq concept file (metadata format={metadata.get('format')!r})")
    if int(metadata.get("version", -1)) != VERSION:
        raise ValueError(f"{path} is concept format version {metadata.get('version')}; "
                         f"this code reads version {VERSION}")
    try:
        base = json.loads(metadata["base"])
        token_order = json.loads(metadata["tokens"])
        concept = Concept(
            name=metadata["name"],
            lora={k: v for k, v in tensors.items() if not k.startswith(_TOKEN_PREFIX)},
            targets=tuple(json.loads(metadata["targets"])),
            base=BaseIdentity(base["name"], base["fingerprint"], base.get("weights", "")),  # old: no weights
            tokens={t: tensors[_TOKEN_PREFIX + t] for t in token_order},
            prompts=json.loads(metadata["prompts"]),
            train_config=json.loads(metadata["train_config"]),
        )
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: concept metadata is incomplete or malformed ({err!r})") from err
    if str(concept.rank) != metadata.get("rank"):
        raise ValueError(f"{path}: metadata says rank {metadata.get('rank')}, "
                         f"its tensors have rank {concept.rank}")
    return concept


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    """NaN or inf in a concept (a diverged run, a damaged file) would turn every video it touches black."""
    for key, t in tensors.items():
        if t.is_floating_point() and not (finite := torch.isfinite(t)).all():
            bad = int((~finite).sum())
            raise ValueError(f"{where}: tensor {key!r} holds {bad} non-finite values (NaN or inf) of "
                             f"{t.numel()}; the concept is broken: train it again")


def check_base(concept: Concept, base: BaseIdentity) -> None:
    """Another name or architecture: refused. Other weights of the same architecture: one warning."""
    if concept.base != base:
        raise ValueError(f"concept {concept.name!r} was trained on base model {concept.base}, "
                         f"but this model is {base}; load the base it belongs to")
    if concept.base.weights and base.weights and concept.base.weights != base.weights:
        print(f"setseq: warning: concept {concept.name!r} was trained on other {base.name} weights (hash "
              f"{concept.base.weights}) than this model's ({base.weights}): the same architecture, but it "
              "may not look as trained; load the base it was trained on", file=sys.stderr)


def apply_concept(model: nn.Module, concept: Concept, *, expected_base: BaseIdentity | None = None,
                  adapter: str | None = None, identity: float = 1.0, motion: float = 1.0) -> list[str]:
    """Inject the concept's layers (exact module names) as adapter `adapter` (default: the concept's
    name) and load its tensors strictly. The model's architecture fingerprint must equal the
    concept's, and so must the whole identity when `expected_base` is given. Returns the modules."""
    fingerprint = base_fingerprint(model)
    if expected_base is not None:
        if expected_base.fingerprint != fingerprint:
            raise ValueError(f"expected base {expected_base} does not describe this model "
                             f"(its fingerprint is {fingerprint})")
        check_base(concept, expected_base)
    elif concept.base.fingerprint != fingerprint:
        check_base(concept, BaseIdentity(name="<this model>", fingerprint=fingerprint))
    adapter = adapter or concept.name
    modules = inject_lora(model, [re.escape(m) for m in concept.modules], rank=concept.rank, name=adapter)
    try:
        load_concept_state_dict(model, concept.lora, adapter)
    except ValueError:
        remove_concept(model, adapter)  # leave the model as it was
        raise
    set_scales(model, identity, motion, concept=adapter)
    return modules
