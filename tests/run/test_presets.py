"""Model presets (conf/model/, one file for both roles): the papers' hub models compose and fail offline naming the
fix; every preset composes as student and as teacher; tiny families build, score, sample; the old spellings of the
teacher and strategy groups still compose to the new configs."""

import json
import re

import huggingface_hub
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    T5ForConditionalGeneration,
)

from kdlab.data.datamodule import pad
from kdlab.models import loading as models
from kdlab.models import scoring
from kdlab.models.loading import (
    ARCHITECTURES,
    DTYPES,
    HubUnavailableError,
    load_model,
    load_tokenizer,
)
from kdlab.models.scoring import is_encoder_decoder, score_targets
from kdlab.run.rundir import RESULTS, STUDENT
from kdlab.sampling.base import SamplingSettings
from kdlab.sampling.hf import generate_targets
from tests.conftest import CONF_DIR, TINY_RUN, compose

# (role, preset) -> (hub id, the class transformers builds for it, paper or "today": the pairs distilled now). The role
# is the one each paper (or today's pairs) gives the model; every preset is one file in conf/model/ for both roles.
HUB_PRESETS = {
    ("teacher", "flan_t5_xl"): ("google/flan-t5-xl", T5ForConditionalGeneration, "GKD"),
    ("teacher", "t5_xl"): ("google/t5-v1_1-xl", T5ForConditionalGeneration, "GKD"),
    ("student", "t5_small"): ("google/t5-v1_1-small", T5ForConditionalGeneration, "GKD"),
    ("student", "t5_base"): ("google/t5-v1_1-base", T5ForConditionalGeneration, "GKD"),
    ("student", "t5_large"): ("google/t5-v1_1-large", T5ForConditionalGeneration, "GKD"),
    ("student", "flan_t5_small"): ("google/flan-t5-small", T5ForConditionalGeneration, "GKD"),
    ("student", "flan_t5_base"): ("google/flan-t5-base", T5ForConditionalGeneration, "GKD"),
    ("student", "flan_t5_large"): ("google/flan-t5-large", T5ForConditionalGeneration, "GKD"),
    ("teacher", "llama2_7b_chat"): ("meta-llama/Llama-2-7b-chat-hf", LlamaForCausalLM, "MultiLevelOT"),
    ("teacher", "mistral_7b_instruct"): ("mistralai/Mistral-7B-Instruct-v0.2", MistralForCausalLM, "MultiLevelOT"),
    ("teacher", "qwen2_7b_instruct"): ("Qwen/Qwen2-7B-Instruct", Qwen2ForCausalLM, "MultiLevelOT"),
    ("student", "opt_350m"): ("facebook/opt-350m", OPTForCausalLM, "MultiLevelOT"),
    ("student", "pythia_410m"): ("EleutherAI/pythia-410m", GPTNeoXForCausalLM, "MultiLevelOT"),
    ("student", "bloomz_560m"): ("bigscience/bloomz-560m", BloomForCausalLM, "MultiLevelOT"),
    ("student", "qwen3_0_6b"): ("Qwen/Qwen3-0.6B", Qwen3ForCausalLM, "today"),
    ("student", "qwen3_1_7b"): ("Qwen/Qwen3-1.7B", Qwen3ForCausalLM, "today"),
    ("student", "qwen3_4b"): ("Qwen/Qwen3-4B", Qwen3ForCausalLM, "today"),
    ("student", "qwen3_8b"): ("Qwen/Qwen3-8B", Qwen3ForCausalLM, "today"),
    ("teacher", "qwen3_8b"): ("Qwen/Qwen3-8B", Qwen3ForCausalLM, "today"),
    ("teacher", "qwen3_14b"): ("Qwen/Qwen3-14B", Qwen3ForCausalLM, "today"),
    ("teacher", "qwen3_32b"): ("Qwen/Qwen3-32B", Qwen3ForCausalLM, "today"),
    ("student", "llama3_2_1b_instruct"): ("meta-llama/Llama-3.2-1B-Instruct", LlamaForCausalLM, "today"),
    ("student", "llama3_2_3b_instruct"): ("meta-llama/Llama-3.2-3B-Instruct", LlamaForCausalLM, "today"),
    ("teacher", "llama3_1_8b_instruct"): ("meta-llama/Llama-3.1-8B-Instruct", LlamaForCausalLM, "today"),
    ("student", "gemma3_270m_it"): ("google/gemma-3-270m-it", Gemma3ForCausalLM, "today"),
    ("student", "gemma3_1b_it"): ("google/gemma-3-1b-it", Gemma3ForCausalLM, "today"),
    # 4B and up are image-text models: AutoModelForCausalLM builds Gemma3ForConditionalGeneration for them
    ("student", "gemma3_4b_it"): ("google/gemma-3-4b-it", Gemma3ForConditionalGeneration, "today"),
    ("teacher", "gemma3_12b_it"): ("google/gemma-3-12b-it", Gemma3ForConditionalGeneration, "today"),
    ("teacher", "gemma3_27b_it"): ("google/gemma-3-27b-it", Gemma3ForConditionalGeneration, "today"),
    ("student", "smollm2_135m_instruct"): ("HuggingFaceTB/SmolLM2-135M-Instruct", LlamaForCausalLM, "today"),
    ("student", "smollm2_360m_instruct"): ("HuggingFaceTB/SmolLM2-360M-Instruct", LlamaForCausalLM, "today"),
    ("student", "smollm2_1_7b_instruct"): ("HuggingFaceTB/SmolLM2-1.7B-Instruct", LlamaForCausalLM, "today"),
    ("teacher", "smollm2_1_7b_instruct"): ("HuggingFaceTB/SmolLM2-1.7B-Instruct", LlamaForCausalLM, "today"),
}
# Students of 4B and more load in bfloat16: float32 weights with AdamW's two moments take 16 bytes a parameter, 64 GB
# and more, past one 80 GB GPU before any activation.
BFLOAT16_STUDENTS = {"qwen3_4b", "qwen3_8b", "gemma3_4b_it"}
TINY_PRESETS = ["tiny", "tiny_t5", "tiny_opt", "tiny_gpt_neox", "tiny_bloom", "tiny_mistral", "tiny_qwen2",
                "tiny_qwen3", "tiny_gemma3", "tiny_llama3", "tiny_smollm2"]
NEW_TINY_PRESETS = TINY_PRESETS[2:]


def _supports(model_cls: type, attn_implementation: str) -> bool:
    flag = {"eager": None, "sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}[attn_implementation]
    return flag is None or bool(getattr(model_cls, flag, False))


def _cached(hub_id: str) -> bool:
    return isinstance(huggingface_hub.try_to_load_from_cache(hub_id, "config.json"), str)


# --- hub presets: compose, and fail offline with the fix --------------------------------------------------------------


@pytest.mark.parametrize("group,preset", sorted(HUB_PRESETS))
def test_hub_preset_composes_with_settings_the_loader_accepts(group, preset, tmp_path):
    """`group` is the role the preset is composed in (`student=X` or `teacher=X`)."""
    hub_id, model_cls, _ = HUB_PRESETS[group, preset]
    cfg = OmegaConf.to_container(compose([f"{group}={preset}"], output_dir=tmp_path)[group], resolve=True)
    assert cfg["path"] == hub_id and cfg["name"]
    assert cfg["dtype"] in DTYPES
    # frozen teachers in half the memory; students in float32 master weights where they fit one GPU with AdamW
    assert cfg["dtype"] == ("bfloat16" if group == "teacher" or preset in BFLOAT16_STUDENTS else "float32")
    assert cfg["trust_remote_code"] is False and cfg["revision"]
    attention = cfg["attn_implementation"]
    assert _supports(model_cls, attention), f"{model_cls.__name__} has no {attention} attention"
    assert (CONF_DIR / "model" / f"{preset}.yaml").read_text().startswith("# ")  # one line: what, which paper


def test_every_hub_preset_on_disk_is_listed_here():
    on_disk = {
        path.stem
        for path in (CONF_DIR / "model").glob("*.yaml")
        if (value := yaml.safe_load(path.read_text()).get("path")) and "${" not in str(value)  # not a shipped asset
    }
    assert on_disk == {preset for _, preset in HUB_PRESETS}


@pytest.mark.parametrize("group,preset", sorted(HUB_PRESETS))
def test_hub_preset_tokenizer_offline_names_local_files(group, preset, tmp_path):
    hub_id = HUB_PRESETS[group, preset][0]
    if _cached(hub_id):
        pytest.skip(f"{hub_id} is in the local cache; offline loading would succeed")
    cfg = compose([f"{group}={preset}"], output_dir=tmp_path)[group]
    with pytest.raises(HubUnavailableError) as err:
        load_tokenizer(cfg)
    text = str(err.value)
    assert hub_id in text and "student.path=/path/to/model_dir" in text and "HF_HOME" in text


def test_hub_preset_model_offline_raises_the_same_error(tokenizer, tmp_path):
    if _cached("facebook/opt-350m"):
        pytest.skip("facebook/opt-350m is in the local cache")
    cfg = compose(["student=opt_350m"], output_dir=tmp_path).student
    with pytest.raises(HubUnavailableError, match="facebook/opt-350m"):
        load_model(cfg, tokenizer)


def test_revision_and_trust_remote_code_reach_from_pretrained(monkeypatch, tmp_path):
    calls = []

    class Recorder:
        @staticmethod
        def from_pretrained(source, **kwargs):
            calls.append((source, kwargs))
            raise OSError("offline")

    monkeypatch.setattr(models, "AutoTokenizer", Recorder)
    cfg = compose(["teacher=mistral_7b_instruct", "teacher.revision=abc123"], output_dir=tmp_path).teacher
    with pytest.raises(HubUnavailableError):
        load_tokenizer(cfg)
    # a tokenizer from elsewhere does not inherit the model's revision
    cfg = compose(["teacher=mistral_7b_instruct", "teacher.revision=abc123", "+teacher.tokenizer=org/other"],
                  output_dir=tmp_path).teacher
    with pytest.raises(HubUnavailableError):
        load_tokenizer(cfg)
    assert calls == [
        ("mistralai/Mistral-7B-Instruct-v0.2", {"trust_remote_code": False, "revision": "abc123"}),
        ("org/other", {"trust_remote_code": False}),
    ]


# --- tiny presets: every family builds, scores aligned targets and samples, offline ----------------------------------


def _tiny(preset: str, seed: int = 0, role: str = "student"):
    cfg = compose([f"{role}={preset}"])[role]
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer).eval(), tokenizer


def test_tiny_presets_cover_every_architecture():
    used = {OmegaConf.load(CONF_DIR / "model" / f"{p}.yaml").architecture for p in TINY_PRESETS}
    assert used == set(ARCHITECTURES)


MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
BY_ROLE = re.compile(r"^\$\{kdlab\.by_role:([^,]+),([^}]+)\}$")  # a setting by role: ${kdlab.by_role:frozen,trained}


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes_in_both_roles(preset, tmp_path):
    """One file serves both roles: `student=X teacher=X` places the same preset at both, each key the same in both
    roles but those set by role (`${kdlab.by_role:frozen,trained}`), and the teacher is a model in this process."""
    from kdlab.teachers.build import MODEL, teacher_kind

    cfg = compose([f"student={preset}", f"teacher={preset}"], output_dir=tmp_path)
    student, teacher = (OmegaConf.to_container(cfg[role], resolve=True) for role in ("student", "teacher"))
    assert teacher_kind(teacher) == MODEL
    raw = yaml.safe_load((CONF_DIR / "model" / f"{preset}.yaml").read_text())
    for key, value in raw.items():
        by_role = BY_ROLE.match(value) if isinstance(value, str) else None
        if by_role:
            assert (teacher[key], student[key]) == by_role.groups(), key
        else:
            assert student[key] == teacher[key], key
    assert set(raw) <= set(teacher) and set(raw) <= set(student)


def test_no_preset_file_exists_twice():
    """Each preset is one file: no copies between groups (conf/student/ is gone; conf/teacher/ holds the other kinds
    of teacher, not models), and no two files under conf/ are the same bytes."""
    assert not (CONF_DIR / "student").exists()
    kinds = {p.stem for p in (CONF_DIR / "teacher").glob("*.yaml")}
    assert kinds == {"cached", "remote", "none", "arith_pair"} and not kinds & set(MODEL_PRESETS)
    by_content: dict[bytes, list[str]] = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        by_content.setdefault(path.read_bytes(), []).append(str(path.relative_to(CONF_DIR)))
    assert [paths for paths in by_content.values() if len(paths) > 1] == []


@pytest.mark.parametrize("old,new", [
    (["teachers=arith_pair", "teachers.combine=route", "teachers.route_field=steps",
      "teachers.routes={2: peer, 3: teacher, 4: teacher}"],
     ["teacher=arith_pair", "teacher.combine=route", "teacher.route_field=steps",
      "teacher.routes={2: peer, 3: teacher, 4: teacher}"]),
    (["strategy=ddp"], ["trainer/strategy=ddp"]),
    (["trainer=ddp", "strategy=ddp"], ["trainer=ddp"]),
    (["trainer=fsdp", "strategy=fsdp", "strategy.mixed_precision=bf16"],
     ["trainer=fsdp", "trainer.strategy.mixed_precision=bf16"]),
])
def test_the_old_spellings_compose_to_the_new_config(old, new, tmp_path):
    composed = [OmegaConf.to_container(compose(overrides, output_dir=tmp_path), resolve=True)
                for overrides in (old, new)]
    assert composed[0] == composed[1]
    assert "teachers" not in composed[0] and "strategy" not in composed[0]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_builds_with_the_tokenizer_special_tokens(preset):
    model, tokenizer = _tiny(preset)
    architecture = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").architecture
    assert type(model) is ARCHITECTURES[architecture][1]
    assert model.config.vocab_size == len(tokenizer) == model.get_output_embeddings().weight.shape[0]
    config_ids = (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id)
    assert config_ids == (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == config_ids[:2]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 5_000 < sum(p.numel() for p in model.parameters()) < 200_000  # tiny: seconds on a CPU


def test_tiny_presets_of_today_s_families_carry_what_sets_each_apart():
    qwen3, tokenizer = _tiny("tiny_qwen3")
    assert qwen3.config.head_dim * qwen3.config.num_attention_heads != qwen3.config.hidden_size  # head_dim apart
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")
    gemma3, _ = _tiny("tiny_gemma3")
    assert gemma3.config.layer_types == ["sliding_attention", "full_attention"]
    longest_prompt = max(len(ids) for ids in tokenizer(PROMPTS, add_special_tokens=False)["input_ids"])
    assert gemma3.config.sliding_window < longest_prompt  # the local layer's window cuts into the test prompts
    assert gemma3.config.final_logit_softcapping is None and gemma3.config.attn_logit_softcapping is None
    llama3, _ = _tiny("tiny_llama3")
    rotary = llama3.model.rotary_emb
    dim = llama3.config.hidden_size // llama3.config.num_attention_heads
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, dim, 2).float() / dim)
    scaled = rotary.inv_freq
    assert torch.equal(scaled[0], unscaled[0]) and (scaled[1:] < unscaled[1:]).all()  # llama3 scaling at work
    smollm2, _ = _tiny("tiny_smollm2")
    assert smollm2.config.num_attention_heads == 3 * smollm2.config.num_key_value_heads
    for model in (qwen3, gemma3, llama3, smollm2):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as the small ones


PROMPTS = ["Question: Bo has 41 cards and buys 2.\nAnswer:", "Q: 9?\nA:", "Question: 12 + 7?\nAnswer:"]
TARGETS = [" 41 + 2 = 43", " 9", " 19 and then some"]


def _reference_logits(model, prompt: list[int], target: list[int]) -> torch.Tensor:
    """One unpadded sequence: the logits that predict each target token."""
    p, t = torch.tensor([prompt]), torch.tensor([target])
    if is_encoder_decoder(model):  # HF's own label shifting behind the decoder start token
        return model(input_ids=p, labels=t).logits[0]
    full = model(input_ids=torch.cat([p, t], dim=1)).logits[0]
    return full[p.shape[1] - 1 : p.shape[1] - 1 + t.shape[1]]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_scores_padded_batches_like_unpadded_rows(preset):
    model, tokenizer = _tiny(preset, seed=3)
    prompts = tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]
    targets = tokenizer(TARGETS, add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id, "left")
    target_ids, target_mask = pad(targets, tokenizer.pad_token_id, "right")
    assert not prompt_mask.all() and not target_mask.all()  # both paddings are exercised
    batched = score_targets(model, prompt_ids, prompt_mask, target_ids, target_mask)
    assert batched.shape == (3, target_ids.shape[1], len(tokenizer))
    for row in range(3):
        reference = _reference_logits(model, prompts[row], targets[row])
        torch.testing.assert_close(batched[row, : len(targets[row])], reference, atol=1e-5, rtol=1e-5)


def test_position_ids_go_only_to_models_that_take_them():
    takes = {name: scoring._takes_position_ids(_tiny(name)[0]) for name in TINY_PRESETS if name != "tiny_t5"}
    assert takes == {"tiny": True, "tiny_opt": True, "tiny_gpt_neox": True, "tiny_bloom": False,
                     "tiny_mistral": True, "tiny_qwen2": True, "tiny_qwen3": True, "tiny_gemma3": True,
                     "tiny_llama3": True, "tiny_smollm2": True}


def _naive_greedy(model, prompt: list[int], steps: int, eos: int, start: int | None) -> list[int]:
    """Greedy decoding of one unpadded prompt without a KV cache: the reference for batched generation."""
    out = []
    for _ in range(steps):
        if start is None:
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1]
        else:
            decoder_ids = torch.tensor([[start, *out]])
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder_ids).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_generates_from_left_padded_prompts_like_one_at_a_time(preset):
    model, tokenizer = _tiny(preset, seed=1, role="teacher")
    prompts = tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id, "left")
    settings = SamplingSettings(max_new_tokens=8, do_sample=False)
    ids, mask = generate_targets(model, prompt_ids, prompt_mask, settings,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    start = model.config.decoder_start_token_id if is_encoder_decoder(model) else None
    for row, prompt in enumerate(prompts):
        expected = _naive_greedy(model, prompt, settings.max_new_tokens, tokenizer.eos_token_id, start)
        assert ids[row][mask[row]].tolist() == expected
        assert (ids[row][~mask[row]] == tokenizer.pad_token_id).all()


# --- one end-to-end run per new family --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", NEW_TINY_PRESETS)
def test_tiny_preset_trains_end_to_end(preset, tmp_path):
    from kdlab.run.train import run

    overrides = [o for o in TINY_RUN if not o.startswith(("teacher=", "student=", "trainer.max_steps="))]
    cfg = compose([*overrides, "trainer.max_steps=2", f"teacher={preset}", f"student={preset}"], output_dir=tmp_path)
    run(cfg)
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["steps"] == 2
    loader = AutoModelForSeq2SeqLM if preset == "tiny_t5" else AutoModelForCausalLM
    exported = loader.from_pretrained(tmp_path / STUDENT)
    architecture = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").architecture
    assert type(exported) is ARCHITECTURES[architecture][1]
