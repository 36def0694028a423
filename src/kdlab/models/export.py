"""What a run keeps of its student: the trained state in checkpoints, and the distilled model on disk.

- `trained_state`: a checkpoint's state dict cut to what training changed: the student, or a LoRA student's
  adapters alone, never a teacher (both are rebuilt from their configs on resume).
- `export_student`: the student in Hugging Face format with its tokenizer (loadable with `from_pretrained`); a LoRA
  student writes the merged model and its adapter in `directory/adapter` (kdlab.models.lora.export_lora).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdlab.models.lora import ADAPTER_KEY, export_lora, has_lora
from kdlab.models.sharding import full_state_dict, is_sharded
from kdlab.run.console import quiet_weight_bars

STUDENT_PREFIX = "student."


def trained_state(state_dict: Mapping[str, Tensor], student: nn.Module) -> dict[str, Tensor]:
    """The entries of a module's state dict that training changed: `student.*`, for a LoRA student its adapters."""
    lora = has_lora(student)
    return {k: v for k, v in state_dict.items()
            if k.startswith(STUDENT_PREFIX) and (not lora or ADAPTER_KEY in k)}


def export_student(student: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str, rank: int = 0) -> None:
    """Write the student and its tokenizer to `directory` (see the module doc). Every process calls it: a sharded
    student is first gathered whole (a collective), then rank 0 writes it."""
    state = full_state_dict(student) if is_sharded(student) else None
    if rank != 0:
        return
    if has_lora(student):
        export_lora(student, state if state is not None else student.state_dict(), directory)
    else:
        size = sum(p.numel() * p.element_size() for p in student.parameters())
        with quiet_weight_bars(size):  # a one-shard bar for a small student says nothing
            if state is None:
                student.save_pretrained(directory)
            else:
                student.save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)
