"""The fused output layer + loss (kdlab.losses.fused) against today's path: logits = the head on the hidden states,
then the kdlab.losses function on the logits. Values and the gradients of the student's hidden states, output weight
and bias agree to 1e-5 in float32 and 1e-10 in float64, through temperature, bias, soft-capping, padded output
layers, masks with unscored rows, different hidden sizes and tied embeddings; nothing (rows, vocab) is kept."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

from kdlab.losses import (
    cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from kdlab.losses.fused import (
    OutputLayer,
    fused_cross_entropy,
    fused_divergence,
    fused_divergence_sum,
    output_layer_of,
)

# (fused name, params, today's function on logits)
CASES = {
    "fkl": ("fkl", {}, forward_kl),
    "rkl": ("rkl", {}, reverse_kl),
    "jsd": ("jsd", {"beta": 0.3}, partial(generalized_jsd, beta=0.3)),
    "jsd_beta0": ("jsd", {"beta": 0.0}, partial(generalized_jsd, beta=0.0)),
    "jsd_beta1": ("jsd", {"beta": 1.0}, partial(generalized_jsd, beta=1.0)),
    "tvd": ("tvd", {}, total_variation),
    "skl": ("skl", {"alpha": 0.2}, partial(skew_forward_kl, alpha=0.2)),
    "skl_alpha0": ("skl", {"alpha": 0.0}, partial(skew_forward_kl, alpha=0.0)),
    "srkl": ("srkl", {"alpha": 0.2}, partial(skew_reverse_kl, alpha=0.2)),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _layers(dtype: torch.dtype, softcap: float | None = 3.0, bias: bool = True, seed: int = 0):
    """Student H=6 and teacher H=9 heads, both padded beyond the tokenizer's 11 columns (13 and 16 rows)."""
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(13, 6, generator=g, dtype=dtype).requires_grad_()
    bs = torch.randn(13, generator=g, dtype=dtype).requires_grad_() if bias else None
    wt = torch.randn(16, 9, generator=g, dtype=dtype)
    bt = torch.randn(16, generator=g, dtype=dtype) if bias else None
    # padded rows hold huge values: if they were used, every value and gradient would be off
    with torch.no_grad():
        ws[11:] = 1e3
        wt[11:] = 1e3
    return OutputLayer(ws, bs, softcap, 11), OutputLayer(wt, bt, None if softcap is None else 2.0, 11)


def _hidden(dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 5, 6, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(3, 5, 9, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    return hs, ht, mask


def _grads(value: torch.Tensor, layer: OutputLayer, hidden: torch.Tensor) -> list[torch.Tensor]:
    inputs = [hidden, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return list(torch.autograd.grad(value, inputs))


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_divergence_equals_logits_path(case: str, dtype: torch.dtype, reduction: str) -> None:
    name, params, reference = CASES[case]
    student, teacher = _layers(dtype)
    hs, ht, mask = _hidden(dtype)
    ref = reference(student.logits(hs), teacher.logits(ht), mask, temperature=1.7, reduction=reduction)
    ref_grads = _grads(ref, student, hs)
    ours = fused_divergence(name, hs, student, ht, teacher, mask, temperature=1.7, reduction=reduction,
                            chunk_size=4, **params)
    assert ours.dtype == dtype
    _assert_close(ours, ref, TOL[dtype])
    for a, b in zip(_grads(ours, student, hs), ref_grads):
        _assert_close(a, b, TOL[dtype])
    assert ref_grads[1][11:].abs().max() == 0  # the padded rows get no gradient on either path


@pytest.mark.parametrize("case", ["fkl", "jsd", "tvd", "srkl"])
def test_divergence_without_bias_or_softcap_full_mask_one_chunk(case: str) -> None:
    name, params, reference = CASES[case]
    student, teacher = _layers(torch.float32, softcap=None, bias=False)
    hs, ht, _ = _hidden(torch.float32)
    ref = reference(student.logits(hs), teacher.logits(ht), None)
    ours = fused_divergence(name, hs, student, ht, teacher, None, **params)  # default chunk: every row at once
    _assert_close(ours, ref, 1e-5)
    for a, b in zip(_grads(ours, student, hs), _grads(ref, student, hs)):
        _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_cross_entropy_equals_logits_path(dtype: torch.dtype, reduction: str) -> None:
    student, _ = _layers(dtype)
    hs, _, mask = _hidden(dtype)
    labels = torch.randint(0, 11, mask.shape, generator=torch.Generator().manual_seed(2))
    labels = labels.masked_fill(~mask, -100)  # unscored labels are never read
    ref = cross_entropy(student.logits(hs), labels, mask, reduction=reduction)
    ours = fused_cross_entropy(hs, student, labels, mask, reduction=reduction, chunk_size=3)
    # relative too in float32: the sum (38.8) came one float32 ulp (3.8e-6) from the logits path on one kernel set,
    # 0 on another, against an absolute 1e-5; 1e-5 + 1e-6 x 38.8 is 13x that ulp
    torch.testing.assert_close(ours, ref, rtol=1e-6 if dtype == torch.float32 else 0, atol=TOL[dtype])
    for a, b in zip(_grads(ours, student, hs), _grads(ref, student, hs)):
        _assert_close(a, b, TOL[dtype])


def test_sum_form_with_row_weights_and_flat_rows() -> None:
    """The (N, H) core with explicit row weights is the weighted sum of per-row losses (here: per-row fkl)."""
    student, teacher = _layers(torch.float64)
    hs, ht, _ = _hidden(torch.float64)
    hs2, ht2 = hs.reshape(15, 6), ht.reshape(15, 9)
    w = torch.linspace(0, 2, 15, dtype=torch.float64)
    ours = fused_divergence_sum("fkl", hs2, student, ht2, teacher, w, temperature=0.8, chunk_size=4)
    per_row = [forward_kl(student.logits(hs2[i:i + 1])[None], teacher.logits(ht2[i:i + 1])[None], temperature=0.8)
               for i in range(15)]
    _assert_close(ours, (torch.stack(per_row) * w).sum(), 1e-12)


def test_empty_mask_gives_zero_with_zero_gradients() -> None:
    student, teacher = _layers(torch.float32)
    hs, ht, mask = _hidden(torch.float32)
    value = fused_divergence("jsd", hs, student, ht, teacher, torch.zeros_like(mask))
    assert value.item() == 0.0
    assert all(g.abs().max() == 0 for g in _grads(value, student, hs))


def test_grad_output_scales_gradients_and_second_backward_raises() -> None:
    student, teacher = _layers(torch.float64)
    hs, ht, mask = _hidden(torch.float64)
    ref = _grads(fused_divergence("rkl", hs, student, ht, teacher, mask), student, hs)
    value = fused_divergence("rkl", hs, student, ht, teacher, mask)
    scaled = _grads(3.0 * value, student, hs)
    for a, b in zip(scaled, ref):
        _assert_close(a, 3.0 * b, 1e-12)
    value = fused_divergence("rkl", hs, student, ht, teacher, mask)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        value.backward()


def test_mismatched_vocab_is_an_error() -> None:
    student, teacher = _layers(torch.float32)
    hs, ht, mask = _hidden(torch.float32)
    with pytest.raises(ValueError, match="student vocab 11 != teacher vocab 12"):
        fused_divergence("fkl", hs, student, ht, OutputLayer(teacher.weight, teacher.bias, None, 12), mask)


def _tiny_llama(hidden: int, tie: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).float()


def test_tied_embeddings_gradients_equal_logits_path() -> None:
    """A tied student (embedding is the output weight): the fused loss's weight gradient adds to the embedding's."""
    student, teacher = _tiny_llama(16, tie=True, seed=0), _tiny_llama(24, tie=False, seed=1).requires_grad_(False)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    params = [p for p in student.parameters()]
    ref = generalized_jsd(student(ids).logits, teacher(ids).logits, mask, beta=0.5, temperature=1.5)
    ref_grads = torch.autograd.grad(ref, params)
    hs = student.model(ids).last_hidden_state
    with torch.no_grad():
        ht = teacher.model(ids).last_hidden_state
    ours = fused_divergence("jsd", hs, output_layer_of(student), ht, output_layer_of(teacher), mask, beta=0.5,
                            temperature=1.5, chunk_size=5)
    _assert_close(ours, ref, 1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), ref_grads):
        _assert_close(a, b, 1e-5)


def test_softcap_read_from_a_gemma2_config_matches_its_logits() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=8,
                          num_attention_heads=2, num_key_value_heads=1, final_logit_softcapping=5.0)
    model = Gemma2ForCausalLM(config).float()
    layer = output_layer_of(model)
    assert layer is not None and layer.softcap == 5.0
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    ref = cross_entropy(model(ids).logits, labels)
    assert model(ids).logits.abs().max() < 5.0  # the model's own logits are capped
    ours = fused_cross_entropy(model.model(ids).last_hidden_state, layer, labels)
    _assert_close(ours, ref, 1e-5)


def test_not_a_plain_linear_head_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_llama(16, tie=False, seed=0)
    assert output_layer_of(model) is not None
    model.lm_head = nn.Sequential(nn.Linear(16, 40, bias=False))
    with caplog.at_level(logging.INFO, logger="kdlab.losses.fused"):
        assert output_layer_of(model) is None
    assert len(caplog.records) == 1 and "not a plain torch.nn.Linear" in caplog.records[0].getMessage()
    scaled = _tiny_llama(16, tie=False, seed=0)
    scaled.config.logit_scale = 0.5
    assert output_layer_of(scaled) is None


def test_no_rows_by_vocab_tensor_is_saved_for_backward() -> None:
    """What the graph keeps (saved tensors and the fused Function's own buffers): nothing of N x V elements, where
    the logits path keeps the logits; the fused Function keeps its gradients, (N, H), (V, H) and (V,)."""
    n, vocab, hidden = 64, 50, 4  # N * V = 3200 > V * H = 200 and N * H = 256
    g = torch.Generator().manual_seed(0)
    layer = OutputLayer(torch.randn(vocab, hidden, generator=g).requires_grad_(), None, 4.0)
    teacher = OutputLayer(torch.randn(vocab, hidden, generator=g))
    hs, ht = torch.randn(n, hidden, generator=g).requires_grad_(), torch.randn(n, hidden, generator=g)

    def saved_sizes(fn) -> list[int]:
        """Sizes of the tensors the graph keeps: saved tensors and tensors held by custom Functions' contexts."""
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            value = fn()
        held = [v for v in vars(value.grad_fn).values() if isinstance(v, (list, tuple, torch.Tensor))]
        for v in held:
            sizes += [t.numel() for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]
        value.backward()
        return sizes

    unfused = saved_sizes(lambda: forward_kl(layer.logits(hs)[None], teacher.logits(ht)[None]))
    assert max(unfused) >= n * vocab  # the check can fail: today's path keeps the logits
    fused = saved_sizes(lambda: fused_divergence("fkl", hs, layer, ht, teacher, chunk_size=8))
    assert sorted(fused) == sorted([n * hidden, vocab * hidden])


MEMORY_SCRIPT = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from kdlab.losses import forward_kl
from kdlab.losses.fused import OutputLayer, fused_divergence
impl, n, vocab, hidden = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
student = OutputLayer(torch.randn(vocab, hidden, generator=g).requires_grad_())
teacher = OutputLayer(torch.randn(vocab, hidden, generator=g))
hs, ht = torch.randn(n, hidden, generator=g).requires_grad_(), torch.randn(n, hidden, generator=g)
def rss(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
def run(hs, ht):
    if impl == "fused":
        fused_divergence("fkl", hs, student, ht, teacher, chunk_size=16).backward()
    else:
        forward_kl(student.logits(hs)[None], teacher.logits(ht)[None]).backward()
run(hs[:8], ht[:8])  # warm-up: libraries' first-call allocations are not the loss's
Path("/proc/self/clear_refs").write_text("5")
before = rss("VmRSS")
run(hs, ht)
print((rss("VmHWM") - before) * 1024)
"""


def _peak_bytes(impl: str, n: int, vocab: int, hidden: int) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps([impl, n, vocab, hidden])],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_peak_memory_is_chunk_bounded() -> None:
    """N = 2048 rows, V = 16,384: one float32 logits tensor is 128 MiB; a 16-row chunk is 1 MiB. The fused peak
    above the inputs stays within the gradients (hidden 0.25 MiB, weight 2 MiB) and a few chunks' temporaries
    (measured 9 MiB; today's path 400 MiB)."""
    n, vocab, hidden = 2048, 16384, 32
    logits_bytes = n * vocab * 4
    unfused = _peak_bytes("unfused", n, vocab, hidden)
    fused = _peak_bytes("fused", n, vocab, hidden)
    assert unfused > 2 * logits_bytes  # student and teacher logits at least: the measurement sees them
    assert fused < logits_bytes / 8, (fused, unfused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uld_equals_logits_path_across_vocabularies_and_lengths(dtype: torch.dtype) -> None:
    """Both compute in the inputs' dtype (float64 kept): 1e-5 in float32, 1e-10 in float64."""
    from kdlab.losses.cross_tokenizer import universal_logit_distillation
    from kdlab.losses.fused import fused_universal_logit_distillation

    g = torch.Generator().manual_seed(7)
    student = OutputLayer(torch.randn(13, 6, generator=g, dtype=dtype).requires_grad_(),
                          torch.randn(13, generator=g, dtype=dtype).requires_grad_(), 3.0, 11)
    teacher = OutputLayer(torch.randn(17, 9, generator=g, dtype=dtype), None, None, 17)  # a larger vocabulary
    hs = torch.randn(3, 5, 6, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(3, 7, 9, generator=g, dtype=dtype)
    s_mask = torch.arange(5)[None] < torch.tensor([[4], [5], [0]])  # the third sequence has no response
    t_mask = torch.arange(7)[None] < torch.tensor([[6], [3], [2]])
    ref = universal_logit_distillation(student.logits(hs), teacher.logits(ht), s_mask, t_mask, temperature=1.5)["uld"]
    ours = fused_universal_logit_distillation(hs, student, ht, teacher, s_mask, t_mask, temperature=1.5,
                                              chunk_size=3)["uld"]
    assert ours.dtype == ref.dtype == dtype
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_close(ours, ref, tolerance)
    for a, b in zip(_grads(ours, student, hs), _grads(ref, student, hs)):
        _assert_close(a, b, tolerance)


@pytest.mark.parametrize("per_batch,std_scaled", [(False, False), (True, False), (True, True)])
def test_ranked_topk_equals_logits_path_at_two_temperatures(per_batch: bool, std_scaled: bool) -> None:
    """MultiLevelOT's ranked, truncated probabilities (t^k, s^k) and their gradients, from hidden states; ranked
    per batch and with each row of logits divided by its standard deviation, as loss=ot's variant=released_code."""
    from kdlab.losses.cross_tokenizer import ranked_topk_probs_at
    from kdlab.losses.fused import fused_ranked_topk_probs_at

    student, _ = _layers(torch.float64)
    hs, _, mask = _hidden(torch.float64)
    temperatures = (1.0, 2.5)
    g = torch.Generator().manual_seed(9)
    upstream = [torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in temperatures]

    def value(tops) -> torch.Tensor:
        return sum((top * u).sum() for top, u in zip(tops, upstream))

    ref = ranked_topk_probs_at(student.logits(hs), mask, 4, temperatures, per_batch, std_scaled)
    ours = fused_ranked_topk_probs_at(hs, student, mask, 4, temperatures, per_batch, chunk_size=4,
                                      std_scaled=std_scaled)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == torch.float64  # both keep float64
        _assert_close(a, b, 1e-12)
    for a, b in zip(_grads(value(ours), student, hs), _grads(value(ref), student, hs)):
        _assert_close(a, b, 1e-10)


@pytest.mark.parametrize("case", ["fkl", "jsd", "tvd", "ce"])
def test_loss_slices_inside_a_matmul_chunk(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A matmul chunk of 5 rows whose loss runs 2 rows at a time (the cache-sized slices) gives today's values."""
    import kdlab.losses.chunking as chunking

    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 2 * 11)  # 2 rows of the 11-column vocabulary per slice
    student, teacher = _layers(torch.float64)
    hs, ht, mask = _hidden(torch.float64)
    if case == "ce":
        labels = torch.randint(0, 11, mask.shape, generator=torch.Generator().manual_seed(2))
        ref = cross_entropy(student.logits(hs), labels, mask)
        ours = fused_cross_entropy(hs, student, labels, mask, chunk_size=5)
    else:
        name, params, reference = CASES[case]
        ref = reference(student.logits(hs), teacher.logits(ht), mask, temperature=0.7)
        ours = fused_divergence(name, hs, student, ht, teacher, mask, temperature=0.7, chunk_size=5, **params)
    _assert_close(ours, ref, 1e-10)
    for a, b in zip(_grads(ours, student, hs), _grads(ref, student, hs)):
        _assert_close(a, b, 1e-10)


@pytest.mark.slow
def test_fused_benchmark_runs_and_its_implementations_agree(tmp_path) -> None:
    """benchmarks/bench_fused.py at a tiny size: fused, today's path (and TRL's when installed) give one value
    (slow: a fresh process per implementation for its memory; 2 minutes on a loaded 2-core machine)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "fused.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks/bench_fused.py"), "--out", str(out), "--repeats", "1",
                           "--threads", "1", "--vocab", "300", "--hidden", "16", "--sizes", "2x8", "4x64",
                           "--max-tflop", "1e-6"], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(c["batch"], c["positions"]) for c in result["cases"]] == [(2, 8)]
    assert result["skipped"] == ["V=300 H=16 4x64: 0.0 TFLOP per call, over --max-tflop"]
    case = result["cases"][0]
    assert case["value_max_abs_diff"] < 1e-6 and max(case["grad_max_abs_diff"].values()) < 1e-6
    assert set(case["peak_bytes"]) == set(result["impls"]) >= {"fused", "logits"}
    assert all(case["times"][impl]["n"] == 2 for impl in result["impls"])
