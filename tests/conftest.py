"""Shared fixtures: offline environment, the composed config, tiny models built in code."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

# No test may reach the network: the hub and W&B are off for the whole session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

# A fast end-to-end setting: tiny random models, few examples, short samples.
TINY_RUN = [
    "teacher=tiny",
    "student=tiny",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "task.train_size=64",
    "task.val_size=16",
    "task.eval_examples=8",
    "task.batch_size=4",
    "task.eval_batch_size=8",
    "task.generation.max_new_tokens=12",
    "policy.sampling.max_new_tokens=12",
    "checkpoint.every_n_train_steps=2",
]


def compose(overrides: list[str] | None = None, output_dir: Path | None = None):
    """The config `python train.py <overrides>` would run, composed in-process."""
    from kdlab.run.compose import compose as compose_conf

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return compose_conf(overrides)


@functools.lru_cache(maxsize=None)
def _loss_node(name: str) -> dict:
    from omegaconf import OmegaConf

    from kdlab.run.compose import compose as compose_conf

    # unresolved: a key interpolated from another (loss=ot's `${kdlab.ot_variant:${.variant},...}`) follows overrides
    return OmegaConf.to_container(compose_conf([f"loss={name}"]).loss, resolve=False)


def loss_config(name: str, **overrides) -> dict:
    """`conf/loss/<name>.yaml` composed (with the base file it lists) and resolved, with `overrides` on top: what
    `loss=<name> loss.key=value` composes."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge(_loss_node(name), overrides)
    return OmegaConf.to_container(node, resolve=True)


@pytest.fixture(scope="session")
def tokenizer():
    from kdlab.models.loading import load_tokenizer

    return load_tokenizer({"tokenizer": str(REPO / "src/kdlab/assets/arith/tokenizer")})


def tiny_model(tokenizer, architecture: str = "llama", seed: int = 0, width: int = 32):
    import torch

    from kdlab.models.loading import load_model

    torch.manual_seed(seed)
    if architecture == "llama":
        config = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256)
    else:
        config = dict(d_model=width, d_ff=2 * width, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
    return load_model({"name": f"tiny-{architecture}", "architecture": architecture, "config": config}, tokenizer)


@pytest.fixture
def one_process_mesh():
    """A gloo process group of one process on a free loopback port, so FSDP2 can shard in the test process; torn
    down afterwards. No MASTER_PORT is left in the environment: the DDP runs that later tests start as subprocesses
    would inherit it, and this process may still hold the port."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """Decoding a small model step by step: one thread is ten times faster than several on a shared 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
