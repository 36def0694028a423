"""Sharding and cross-rank arithmetic: FSDP2 through Lightning's ModelParallelStrategy, and cross-rank flags.

`trainer=fsdp` builds `FSDP2Strategy`: PyTorch's `fully_shard` (FSDP2) per transformer block, then per model, for
the student and for the frozen teacher, applied in `DistillationModule.configure_model`. FSDP2 runs on CPU with gloo
as well as on GPUs with NCCL (Lightning's older FSDPStrategy refuses CPU), so the same path is tested in CI.

`within_forward` runs code other than `forward` (the fused output layer and loss, kdlab.step.fused) as a forward pass
of a sharded model, so that FSDP2 gathers its root parameters for it and reduce-scatters their gradients.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from kdlab.models.loading import DTYPES as MODEL_DTYPES
from kdlab.models.loading import enable_activation_checkpointing
from kdlab.models.lora import tied_parameter_names

T = TypeVar("T")
# The method `shard_model` adds to each root module: FSDP2's forward hooks run around it (`within_forward`).
WITHIN_FORWARD = "kdlab_within_forward"

# The models' dtype names, and the short ones FSDP configs usually carry.
DTYPES = {**MODEL_DTYPES, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ShardingOptions:
    """How `fully_shard` wraps the models (the `trainer.strategy` keys of `trainer=fsdp`).

    mixed_precision: parameter dtype during forward/backward ("bf16"), gradients reduced in float32; null: float32.
    activation_checkpointing: recompute each student block in backward instead of keeping its activations.
    offload_teacher: keep the teacher's shards in CPU memory and stream each block to the GPU when it runs (on a
        CPU mesh the shards are in CPU memory already: nothing to do).
    reshard_after_forward: free gathered parameters after each block's forward (less memory, one more all-gather).
    """

    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    offload_teacher: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in DTYPES:
            raise ValueError(f"trainer.strategy.mixed_precision={self.mixed_precision!r}: use bf16, fp16 or null")


class FSDP2Strategy(ModelParallelStrategy):
    """Pure data-parallel FSDP2: one mesh dimension over every process of every node, no tensor parallelism.

    ModelParallelStrategy's "auto" sizes put processes of one node on the tensor-parallel axis; distillation wants
    them all sharding data, so the mesh is (world size, 1). The sharding options travel with the strategy so that the
    module's `configure_model` reads them from the trainer.
    """

    def __init__(
        self,
        mixed_precision: str | None = None,
        activation_checkpointing: bool = False,
        offload_teacher: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.sharding = ShardingOptions(mixed_precision, activation_checkpointing, offload_teacher,
                                        reshard_after_forward)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load, with the model's entries allowed to be partial: checkpoints leave out the frozen
        teacher and a LoRA student's base (`DistillationModule.on_save_checkpoint`, rebuilt from their configs), and
        a strict load would ask for them. The optimizer's entries must all be there."""
        from lightning.fabric.strategies import model_parallel
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint import load as load_sharded

        strict_load = model_parallel._distributed_checkpoint_load

        def load(state: dict[str, Any], path: Any) -> None:
            if set(state) != {"state_dict"}:
                return strict_load(state, path)
            load_sharded(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))

        model_parallel._distributed_checkpoint_load = load
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            model_parallel._distributed_checkpoint_load = strict_load


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names Hugging Face lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    # by MRO: once sharded, a block's class is FSDP's subclass of it (FSDPLlamaDecoderLayer)
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} lists no transformer block classes in `_no_split_modules`, so FSDP cannot "
            "shard it block by block; use trainer=ddp for this model"
        )
    return blocks


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: Any, options: ShardingOptions, *, frozen: bool) -> None:
    """`fully_shard` each block, then the whole model (embeddings and head), in place.

    The frozen teacher gets no mixed-precision reduce (it has no gradients) and may live in CPU memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if options.activation_checkpointing and not frozen:  # may repeat `student.gradient_checkpointing`: idempotent
        enable_activation_checkpointing(model)
    param_dtype = DTYPES[options.mixed_precision] if options.mixed_precision else None
    precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    # On a CPU mesh the shards already live in CPU memory (and FSDP's offload policy asks for an accelerator).
    offload_wanted = frozen and options.offload_teacher and mesh.device_type != "cpu"
    offload = CPUOffloadPolicy() if offload_wanted else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=precision, offload_policy=offload,
                  reshard_after_forward=options.reshard_after_forward)
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    _register_within_forward(model)


def _call(self: nn.Module, fn: Callable[[], T]) -> T:
    return fn()


def _register_within_forward(model: nn.Module) -> None:
    """Give the sharded root `model` a method that calls any function between FSDP2's forward hooks."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, WITHIN_FORWARD, types.MethodType(_call, model))
    register_fsdp_forward_method(model, WITHIN_FORWARD)


def within_forward(model: nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` as a forward pass of `model`: the plain call unless `shard_model` sharded it.

    FSDP2 gathers a unit's parameters only inside that unit's forward; outside it the root unit's parameters (the
    embeddings, the final norm, the output layer: whatever the blocks leave) are the local shards of DTensors. Code
    that calls the decoder stack and reads the output weight itself, as the fused loss does, runs here: FSDP2's
    pre-forward hook gathers the root unit (and its lazy initialisation runs, when this is the first forward), the
    parameters are whole tensors for the call, and gradients that reach them are reduce-scattered in backward like
    those of the model's own forward (the hook registered on the call's grad-requiring outputs, or the root's
    final post-backward callback). The blocks gather themselves as in any forward. Under `torch.no_grad()` FSDP2
    registers no backward hooks: a frozen model's call costs no collective in backward. `fn` takes no arguments, so
    nothing it reads passes through FSDP2's input casting (mixed precision casts the blocks' inputs there)."""
    method = getattr(model, WITHIN_FORWARD, None)
    return fn() if method is None else method(fn)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer gathered whole on CPU (a collective: every rank must call it).

    A tied parameter (e.g. the output head sharing the embedding) appears once, under its first name, as
    `save_pretrained` writes it for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    duplicates = tied_parameter_names(model)
    return {name: tensor for name, tensor in state.items() if name not in duplicates}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on at least one (all processes must call it)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
