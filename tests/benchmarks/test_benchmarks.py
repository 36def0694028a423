"""The benchmark scripts run at a tiny size, and what they compare kdlab with computes the same values.

No timing is asserted (a shared machine makes any threshold flaky); values and the JSON each script writes are."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.losses import forward_kl, generalized_jsd, reverse_kl

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from reference import unchunked_generalized_jsd  # noqa: E402


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), "--out", str(out), "--repeats", "1", *args],
                          capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("beta,kdlab", [(0.0, forward_kl), (1.0, reverse_kl), (0.5, None), (0.2, None)])
def test_unchunked_reference_equals_kdlab_in_value_and_gradient(beta, kdlab):
    # float64: both keep it, so they agree to rounding; in float32 the values came 4.8e-7 apart against abs=1e-6
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(3, 7, 50, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(3, 7, 50, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) < 0.7
    fn = kdlab or (lambda a, b, m, **kw: generalized_jsd(a, b, m, beta=beta, **kw))
    ours = fn(s, t, mask, chunk_size=4)
    (our_grad,) = torch.autograd.grad(ours, s)
    ref = unchunked_generalized_jsd(s, t, mask, beta=beta)
    (ref_grad,) = torch.autograd.grad(ref, s)
    assert ours.dtype == ref.dtype == torch.float64
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(our_grad, ref_grad, atol=1e-13, rtol=0)


@pytest.mark.slow
def test_loss_benchmark_reports_equal_values_and_both_memories(tmp_path):
    result = run_script("bench_losses.py", tmp_path, "--vocab", "300", "--sizes", "2x8", "--losses", "jsd",
                        "--no-trl-check", "--threads", "1")
    assert [c["loss"] for c in result["cases"]] == ["jsd"]
    for case in result["cases"]:
        assert case["value_abs_diff"] < 1e-5 and case["grad_max_abs_diff"] < 1e-6
        assert case["kdlab_peak_bytes"] >= 0 and case["reference_peak_bytes"] > 0
        assert case["kdlab_time"]["n"] == case["reference_time"]["n"] == 1
    assert result["machine"]["torch"] == torch.__version__ and "| jsd |" in result["table"]


def test_sinkhorn_benchmark_solvers_agree_with_pot(tmp_path):
    result = run_script("bench_sinkhorn.py", tmp_path, "--positions", "6", "--k", "4", "--batches", "2",
                        "--sweep-positions", "7", "--ot-positions", "5", "--vocab", "40", "--no-memory",
                        "--threads", "1")
    sinkhorn = [c for c in result["cases"] if c["part"] == "sinkhorn"]
    assert [(c["batch"], c["positions"], c["k"]) for c in sinkhorn] == [(8, 6, 50), (8, 7, 4), (2, 7, 50)]
    for case in sinkhorn:  # the same 20 unrolled iterations: the same value to float32 rounding
        values = case["values"]
        assert set(values) == {"kdlab", "pot_batch", "pot_loop", "pot_batch_kernel", "pot_loop_kernel"}
        assert max(abs(v - values["kdlab"]) for v in values.values()) < 1e-5 * max(1.0, abs(values["kdlab"]))
    assert [c["part"] for c in result["cases"]][-1] == "multilevel_ot"


@pytest.mark.slow
def test_step_benchmark_runs_kdlab_steps_and_counts_flops(tmp_path):
    result = run_script("bench_step.py", tmp_path, "--batch", "2", "--max-new-tokens", "4", "--no-trl",
                        "--threads", "1")
    for side in ("kdlab", "kdlab_compiled"):  # sampling through generate, and through the compiled loop
        kdlab = result[side]
        assert 0 < kdlab["tokens"][0] <= 2 * 4 and kdlab["tokens_per_sec"] > 0 and kdlab["first_step_s"] > 0
        assert 0 < kdlab["mfu"] < 1
    assert result["matmul_peak_flops_per_sec"] > 0
    # each kdlab side's timed path (fused, as the run decides) against plain forwards and the unchunked JSD on the
    # same samples: 2.5e-9 apart when measured (a loss of 6.9e-4), the bound 40x that
    assert result["kdlab_fused"] == {"kdlab": True, "kdlab_compiled": True}
    same = result["same_batch_loss"]
    assert same["reference"] > 0
    assert same["kdlab"] == pytest.approx(same["reference"], abs=1e-7)
    assert same["kdlab_compiled"] == pytest.approx(same["reference"], abs=1e-7)


@pytest.mark.slow
def test_step_benchmark_runs_trls_distillation_trainer_on_policy_with_the_same_loss(tmp_path):
    pytest.importorskip("trl.trainer.distillation_trainer")
    result = run_script("bench_step.py", tmp_path, "--batch", "2", "--max-new-tokens", "4", "--compile", "off",
                        "--no-gkd", "--threads", "1")
    assert "trl" not in result and result["trl_note"] is None  # --no-gkd: GKDTrainer's side is off
    side = result["trl_distillation"]
    assert 0 < side["tokens"][0] <= 2 * 4 and 0 < side["sampled_widths"][0] <= 4  # its own samples, 4 at most
    for key in ("tokens_per_sec", "steps_per_sec", "model_flops_per_sec", "mfu", "first_step_s"):
        assert math.isfinite(side[key]) and side[key] > 0, key
    for key in ("time", "sampling_time", "rest_of_step_time"):
        assert side[key]["n"] == 1 and math.isfinite(side[key]["median_s"]) and side[key]["median_s"] > 0, key
    assert math.isfinite(result["throughput_ratio_kdlab_over_trl_distillation"])
    settings = result["distillation_trainer_settings"]  # what it ran with, next to its defaults
    assert {key: settings[key]["used"] for key in ("beta", "temperature", "max_completion_length", "learning_rate",
                                                   "gradient_checkpointing", "use_vllm")} == {
        "beta": 0.5, "temperature": 1.0, "max_completion_length": 4, "learning_rate": 1e-5,
        "gradient_checkpointing": False, "use_vllm": False}
    assert settings["beta"]["default"] == 1.0  # its default is reverse KL: the benchmark sets JSD(0.5)
    # one set of kdlab samples, copies of the same weights: its chunked JSD is kdlab's fused step (the timed path)
    # and the plain reference (5.8e-11 and 2.5e-9 apart when measured, on a loss of 6.9e-4; the bounds 40x or more)
    same = result["same_batch_loss"]
    assert result["kdlab_fused"] == {"kdlab": True} and same["kdlab"] > 0
    assert same["trl_distillation"] == pytest.approx(same["kdlab"], abs=1e-7)
    assert same["kdlab"] == pytest.approx(same["reference"], abs=1e-7)


def test_smollm_pair_builds_a_135m_teacher_and_a_50m_student_over_49152_token_ids(tmp_path):
    from bench_step import ASSETS, padded_tokenizer, smollm_pair
    from transformers import AutoTokenizer

    tokenizer = padded_tokenizer(49152, str(tmp_path))
    arith = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    assert len(tokenizer) == 49152 and len(arith) == 746
    text = "Q: what is 12 + 345 - 6? Think step by step. A:"
    assert tokenizer(text).input_ids == arith(text).input_ids  # the appended ids are never produced by encoding
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    with torch.device("meta"):  # the real shapes, no weights
        teacher, student = smollm_pair(tokenizer)
    for model, layers in ((teacher, 30), (student, 6)):
        config = model.config
        assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (
            "llama", 576, 1536, layers, 9, 3, 49152)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
        assert config.eos_token_id == 2 and config.pad_token_id == 0
    # SmolLM2-135M's 134,515,008 parameters; the student 49,552,704
    assert sum(p.numel() for p in teacher.parameters()) == 134_515_008
    assert sum(p.numel() for p in student.parameters()) == 49_552_704


def test_smollm_pair_scaled_down_to_one_layer_runs_a_kdlab_step_over_the_whole_vocabulary():
    from argparse import Namespace

    from bench_step import KdlabStep, first_batch, load

    tokenizer, teacher, student = load("cpu", torch.float32, "smollm", layers=(1, 1))
    assert student.get_output_embeddings().weight.shape == (len(tokenizer), 576) == (49152, 576)
    batch, _ = first_batch(tokenizer, 2, "cpu")
    step = KdlabStep(student, teacher, tokenizer, Namespace(max_new_tokens=4, beta=0.5, lr=1e-5))
    step(batch)
    assert step.step.fused  # the training step's own path, as the run decides: the fused output layer and loss
    assert 0 < step.widths[0] <= 4 and 0 < step.tokens[0] <= 2 * 4
    assert not teacher.training and student.training  # the teacher is kept in eval mode


# DialogSum's original dev/test files beside the repo (../shared/data/dialogsum), or under $KDLAB_SHARED_DATA
DIALOGSUM = Path(os.environ.get("KDLAB_SHARED_DATA") or BENCHMARKS.parents[1] / "shared" / "data") / "dialogsum"
needs_dialogsum = pytest.mark.skipif(not (DIALOGSUM / "dev.jsonl").is_file(),
                                     reason=f"DialogSum's files are not at {DIALOGSUM}")


@needs_dialogsum
def test_dialogsum_prompts_are_256_to_450_tokens_in_the_task_format_and_chat_template(tmp_path):
    from bench_step import DIALOGSUM_LENGTHS, dialogsum_batch, dialogsum_rows, dialogsum_tokenizer

    tokenizer = dialogsum_tokenizer(DIALOGSUM, 49152, str(tmp_path))
    assert len(tokenizer) == 49152  # the smollm pair's output layers
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    dialogue = dialogsum_rows(DIALOGSUM)[0]["dialogue"]
    assert tokenizer.decode(tokenizer(dialogue, add_special_tokens=False).input_ids) == dialogue  # byte-level: lossless
    assert dialogsum_tokenizer(DIALOGSUM, 49152, str(tmp_path / "again")).get_vocab() == tokenizer.get_vocab()
    batch = dialogsum_batch(tokenizer, 4, "cpu", DIALOGSUM, seed=0)
    lengths = batch.student.prompt_mask.sum(1).tolist()
    assert all(DIALOGSUM_LENGTHS[0] <= n <= DIALOGSUM_LENGTHS[1] for n in lengths) and len(lengths) == 4
    ids, mask = batch.student.prompt
    assert not mask[:, -1].logical_not().any()  # left-padded: every row ends at the last column
    text = tokenizer.decode(ids[0][mask[0]])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\nSummarize the following dialogue.\n\n#Person1#:" in text
    assert text.split("<|im_end|>\n<|im_start|>assistant")[0].endswith("\n\nSummary:")


def test_dialogsum_prompts_without_the_files_stop_with_one_line_naming_the_option(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_step.py"), "--pair", "smollm", "--prompts",
                           "dialogsum", "--data", str(tmp_path), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"--prompts dialogsum: {tmp_path / 'dev.jsonl'} not found; point --data at the folder holding DialogSum's "
        f"dev.jsonl and test.jsonl (default {BENCHMARKS.parents[1] / 'shared' / 'data' / 'dialogsum'})"]


@pytest.mark.slow
@needs_dialogsum
def test_step_benchmark_on_dialogsum_prompts_scores_the_same_loss_on_every_side(tmp_path):
    pytest.importorskip("trl.trainer.distillation_trainer")
    result = run_script("bench_step.py", tmp_path, "--pair", "smollm", "--prompts", "dialogsum", "--data",
                        str(DIALOGSUM), "--layers", "1", "1", "--batch", "2", "--max-new-tokens", "4", "--compile",
                        "off", "--no-gkd", "--threads", "1")
    assert all(256 <= n <= 450 for n in result["prompt_lengths"]) and result["prompt_width"] >= 256
    # float32 forwards over ~300-position prompts: kdlab and the reference 1.2e-7 apart here (1.0e-7 at full size),
    # DistillationTrainer 0 apart, on a loss of 0.20; the bound 8x the largest
    same = result["same_batch_loss"]
    assert result["kdlab_fused"] == {"kdlab": True} and same["kdlab"] > 0
    assert same["trl_distillation"] == pytest.approx(same["kdlab"], abs=1e-6)
    assert same["kdlab"] == pytest.approx(same["reference"], abs=1e-6)
    assert math.isfinite(result["step_time_ratio_trl_distillation_over_kdlab"])


@pytest.mark.slow
def test_activation_checkpointing_benchmark_keeps_fewer_tensors_with_the_same_gradients(tmp_path):
    result = run_script("bench_activation_checkpointing.py", tmp_path, "--sizes", "2x64", "--layers", "2",
                        "--width", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--intermediate", "64",
                        "--vocab", "768", "--threads", "1")
    (case,) = result["results"]
    assert case["grad_max_abs_diff"] < 1e-6  # checkpointing changes no gradient
    assert 0 < case["on_saved_bytes"] < 0.5 * case["off_saved_bytes"]  # the blocks' activations are not kept
    assert case["off_peak_bytes"] >= 0 and case["on_peak_bytes"] >= 0
    assert case["off_time"]["n"] == case["on_time"]["n"] == 1


def test_flop_count_counts_every_weight_but_the_input_embedding():
    from bench_step import non_embedding_params, step_flops
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert non_embedding_params(model) == total - 50 * 16
    # 2 P per position forward (sampling, teacher), 6 P for the student's scored forward + backward
    assert step_flops(10, 20, batch=2, prompt_width=3, sampled_width=5) == (2 * 10 + 2 * 20 + 6 * 10) * 2 * 8


@pytest.mark.slow
def test_sparse_teacher_benchmark_compares_top_k_losses_with_the_dense_ones_and_times_the_cache(tmp_path):
    result = run_script("bench_sparse_teacher.py", tmp_path, "--batch", "4", "--ks", "8", "746", "--repeats", "1",
                        "--threads", "1")
    rows = {(r["loss"], r["k"]): r for r in result["losses"]}
    for loss in ("fkl", "rkl", "jsd"):
        assert rows[(loss, 746)]["value rel. diff"] == pytest.approx(0.0, abs=1e-5)  # k = V: the dense loss
        assert rows[(loss, 746)]["grad cosine"] == pytest.approx(1.0, abs=1e-6)
        assert rows[(loss, 8)]["top-k"] <= rows[(loss, 8)]["dense"] + 1e-6  # the buckets never exceed the dense loss
    assert set(result["teacher_share"]) == {"live teacher forward", "cache lookup (k=32)"}


def test_step_memory_benchmark_runs_both_paths_with_the_same_losses(tmp_path):
    """bench_step_memory.py, scaled down (one layer each, a 2,048-row output layer over 2,000 tokens): the fused
    and the logits path train the same pair to the same losses, and each reports its peaks."""
    result = run_script("bench_step_memory.py", tmp_path, "--layers", "1", "1", "--vocab", "2048",
                        "--tokenizer-size", "2000", "--batch", "2", "--prompt", "8", "--response", "16",
                        "--dtype", "float32", "--threads", "1")
    fused, logits = result["fused"], result["logits"]
    assert fused["fused_plan"] and not logits["fused_plan"]  # loss.fused decides the path
    assert len(fused["losses"]) == len(logits["losses"]) == 2 and fused["losses"][0] > 0
    assert result["max_loss_diff"] < 1e-5  # the same step: float32 rounding only
    assert fused["losses"][1] != fused["losses"][0]  # AdamW moved the student between the steps
    assert fused["student_params"] < fused["teacher_params"]
    assert fused["last_step_peak_bytes"] >= 0 and logits["process_peak_bytes"] > 0


def test_sampling_layers_benchmark_times_both_ways_on_the_same_values(tmp_path):
    result = run_script("bench_sampling_layers.py", tmp_path, "--layers", "1", "--rows", "1", "4", "--batch", "2",
                        "--max-new-tokens", "4", "--student-layers", "1", "--threads", "1")
    assert [(c["V"], c["H"], c["rows"]) for c in result["layers"]] == [(49152, 576, 1), (49152, 576, 4)]
    assert all(c["max_abs_diff"] < 1e-4 and c["nn.Linear"]["n"] == c["W @ x.T"]["n"] == 1 for c in result["layers"])
    decoder = result["decoder_layers"]
    assert decoder["layers"] == 7 and decoder["max_abs_diff"] < 1e-4  # one SmolLM2 block: q, k, v, o, gate, up, down
    generation = result["generate"]
    assert generation["speedup"] > 0 and generation["same_tokens_under_one_seed"] is True


def test_speculative_acceptance_benchmark_counts_what_the_teacher_kept(tmp_path):
    # 8 prompts: K = the vocabulary keeps every proposal (the on-policy samples)
    result = run_script("bench_speculative_acceptance.py", tmp_path, "--prompts", "8", "--batch-size", "8")
    rows = result["rows"]
    assert [r["K"] for r in rows] == [1, 2, 3, 5, 10, 25, 50, result["vocabulary"]]
    accepted = [r["accepted"] for r in rows]
    assert all(0.0 < a <= 1.0 for a in accepted) and accepted[-1] == 1.0 and rows[-1]["replaced_per_row"] == 0
    assert accepted[0] < 1.0  # K = 1: the teacher's argmax only; the shipped student disagrees somewhere
    for r in rows:  # the shares and per-row counts describe the same tokens
        assert r["replaced_per_row"] == pytest.approx((1 - r["accepted"]) * r["tokens_per_row"])
