"""The one builder of teachers, and what each kind cannot do with a run's loss and policy (checked at start-up).

`teacher=` picks a kind, or a model preset for the in-process teacher (`teacher=qwen3_8b`; conf/model/):

    kind: model      (no `kind` key)  a model in this process           kdlab.teachers.model.ModelTeacher
    kind: cached     teacher=cached   a top-k cache on disk             kdlab.teachers.cached.CachedTeacher
    kind: remote     teacher=remote   a teacher server                  kdlab.teachers.remote.RemoteTeacher
    kind: several    teacher=arith_pair   several members, `combine: mixture | route`
                                      kdlab.teachers.mixture.MixtureTeacher, kdlab.teachers.routed.RoutedTeacher

Outside teachers (a cache, a server, and such members) are opened and checked against this run before any model
loads, so every mismatch stops the run before anything heavy is built.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from kdlab.losses.sampled import RKL_SAMPLED
from kdlab.sampling.base import Sampler
from kdlab.teachers.base import Teacher

MODEL, CACHED, REMOTE, SEVERAL = "model", "cached", "remote", "several"
KINDS = (MODEL, CACHED, REMOTE, SEVERAL)
MIXTURE, ROUTE = "mixture", "route"
COMBINES = (MIXTURE, ROUTE)
# a member of several teachers, or the teacher, reached as a model preset's node (conf/model/*.yaml)
SamplerFactory = Callable[[Any, PreTrainedTokenizerBase], Sampler]


def teacher_kind(node: Mapping[str, Any] | None) -> str | None:
    """None without a teacher; else the node's `kind` (a model when it names none)."""
    return None if node is None else str(node.get("kind") or MODEL)


# -- start-up checks -------------------------------------------------------------------------------------------------
def teacher_errors(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of the run's teacher node (conf/teacher/*.yaml or a model preset) with its loss and policy."""
    node = cfg.get("teacher")
    kind = teacher_kind(node)
    errors = speculative_errors(kind, cfg["policy"], cfg["loss"])
    if kind is None:
        return errors
    if kind not in KINDS:
        return [f"teacher.kind={kind!r} is unknown; choose one of {KINDS}"]
    if kind == SEVERAL:
        return errors + _several_errors(node, cfg["policy"], cfg["loss"])
    return errors + _single_errors(node, cfg["policy"], cfg["loss"])


def speculative_errors(kind: str | None, policy: Mapping[str, Any], loss: Mapping[str, Any]) -> list[str]:
    """policy=speculative reads the teacher's distribution at every token the student proposes: one model in this
    process that reads the student's tokens (a teacher with another tokenizer is refused once the tokenizers are
    compared, kdlab.run.validate.vocabulary_errors)."""
    if not policy.get("speculative") or float(policy.get("student_fraction", 0.0)) <= 0:
        return []
    why = {CACHED: "a cache holds the teacher's distributions on fixed targets only, not on the student's proposals",
           REMOTE: "a server would need a round trip per token",
           SEVERAL: "several teachers have no one top-K to keep a proposal in",
           None: "there is no teacher"}
    if kind not in (MODEL, *why):
        return []  # an unknown kind: reported by teacher_errors
    if kind != MODEL:
        return [f"policy=speculative needs the teacher's distribution at every token the student proposes, from one "
                f"model in this process (teacher=<model preset>): with teacher={kind or 'none'}, {why[kind]}"]
    if loss.get("name") in ("ot", "uld"):
        return [f"policy=speculative keeps a student token when it is in the teacher's top-K, so both must share a "
                f"tokenizer; loss={loss.get('name')} is for a teacher with another one (use fkl, rkl or jsd)"]
    return []


def _single_errors(node: Mapping[str, Any], policy: Mapping[str, Any], loss: Mapping[str, Any]) -> list[str]:
    """What a cached or remote teacher cannot do with this run's loss and policy, each with its fix."""
    kind = teacher_kind(node)
    if kind not in (CACHED, REMOTE):
        return []
    from kdlab.losses.objective import build_objective
    from kdlab.losses.sparse import sparse_form

    errors = []
    key = "dir" if kind == CACHED else "url"
    if not node.get(key):
        errors.append(f"teacher={kind} needs teacher.{key}")
    if kind == CACHED:
        from kdlab.teachers.cache_verify import VERIFY_MODES

        if node.get("verify", "sampled") not in VERIFY_MODES:
            errors.append(f"teacher.verify={node.get('verify')!r}: one of {', '.join(VERIFY_MODES)} (how much of "
                          f"the cache is re-read against its checksums before training)")
        for name in ("verify_blocks", "verify_seed"):
            value = node.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                errors.append(f"teacher.{name}={value!r}: an integer >= 0")
    fraction = float(policy["student_fraction"])
    if kind == CACHED and fraction > 0:
        errors.append(f"teacher=cached holds the teacher's distributions on the fixed training targets only, but "
                      f"policy.student_fraction={fraction} trains on the student's own samples: use teacher=remote "
                      f"(a teacher server scores any sequence), or policy=supervised")
    if kind == REMOTE and policy.get("fixed_source") == "teacher" and fraction < 1:
        errors.append("teacher=remote cannot sample SeqKD targets (policy.fixed_source=teacher): a server scores "
                      "sequences, it does not sample them; write the teacher's samples once with kdlab-cache-teacher "
                      "cache.targets=teacher and train with teacher=cached, or train on the ground truth "
                      "(policy.fixed_source=ground_truth)")
    if loss.get("name") == RKL_SAMPLED:  # reads the sampled tokens' log-probabilities, not a top-k
        return errors
    try:
        sparse_form(build_objective(loss).loss)
    except (ValueError, KeyError, TypeError) as err:
        errors.append(f"loss={loss.get('name')} with teacher={kind}: {err}")
    return errors


def _several_errors(node: Mapping[str, Any], policy: Mapping[str, Any], loss: Mapping[str, Any]) -> list[str]:
    members, errors = dict(node.get("members") or {}), []
    model_keys = sorted(k for k in ("path", "architecture", "tokenizer") if node.get(k) is not None)
    if model_keys:  # `teacher=<model preset>` placed its keys beside the several-teachers option
        errors.append(f"a model preset (teacher.{model_keys[0]}) and several teachers (teacher={node.get('name')}) "
                      f"are both set: a run distils from one teacher or from several; drop the model preset's "
                      f"teacher= override")
    if len(members) < 2:
        errors.append(f"teacher.members holds {len(members)} teacher(s); several teachers means two or more")
    errors += [f"teacher.members.{n}: a member's name is a plain identifier" for n in members if not n.isidentifier()]
    name = loss.get("name")
    if name in ("ot", "uld", "sft"):
        from kdlab.losses.divergences import DIVERGENCES

        errors.append(f"loss={name} with several teachers: the members share the student's tokenizer and are "
                      f"combined token by token, so the loss is a divergence ({', '.join(DIVERGENCES)}); a "
                      f"teacher with another tokenizer is distilled alone with loss=ot or loss=uld")
    if policy.get("fixed_source") == "teacher" and float(policy["student_fraction"]) < 1:
        errors.append("policy=seqkd samples its targets from one teacher; with several, train on the ground truth "
                      "or the student's own samples")
    errors += _combine_errors(node, members)
    for member_name, member in members.items():
        if teacher_kind(member) == SEVERAL:
            errors.append(f"teacher.members.{member_name}: a member is one teacher, not several")
            continue
        errors += [f"teacher.members.{member_name}: {e}" for e in _single_errors(member, policy, loss)]
    return errors


def _combine_errors(node: Mapping[str, Any], members: Mapping[str, Any]) -> list[str]:
    errors = []
    combine = node.get("combine")
    if combine not in COMBINES:
        errors.append(f"teacher.combine={combine!r} is unknown; choose one of {COMBINES}")
    weights = dict(node.get("weights") or {})
    if combine == MIXTURE:
        errors += [f"teacher.weights.{n} is missing: a mixture weighs every member" for n in members
                   if n not in weights]
        errors += [f"teacher.weights.{n}={w} must be > 0" for n, w in weights.items() if float(w) <= 0]
    errors += [f"teacher.weights.{n} names no member ({', '.join(members)})" for n in weights if n not in members]
    if combine == ROUTE:
        routes = dict(node.get("routes") or {})
        if not node.get("route_field") or not routes:
            errors.append("teacher.combine=route needs teacher.route_field (an example field) and teacher.routes "
                          "(its values -> member names)")
        errors += [f"teacher.routes.{v}={n} names no member ({', '.join(members)})" for v, n in routes.items()
                   if n not in members]
    if int(node.get("top_k") or 0) < 1:
        errors.append(f"teacher.top_k={node.get('top_k')!r} must be >= 1 (a model member's top-k beside cached or "
                      f"remote members)")
    return errors


def member_tokenizer_errors(node: Mapping[str, Any] | None, student_tokenizer: Any) -> list[str]:
    """Several teachers are combined token by token: each model member must share the student's tokenizer."""
    if teacher_kind(node) != SEVERAL or student_tokenizer is None:
        return []
    from kdlab.models.loading import HubUnavailableError, load_tokenizer, same_vocabulary

    errors = []
    for name, member in (node.get("members") or {}).items():
        if teacher_kind(member) != MODEL:
            continue
        try:
            same = same_vocabulary(student_tokenizer, load_tokenizer(member))
        except (OSError, ValueError, HubUnavailableError) as err:
            errors.append(f"teacher.members.{name}: {err}")
            continue
        if not same:
            errors.append(f"teacher.members.{name} ({member.get('name')}) tokenizes differently from the student: "
                          f"several teachers must share the student's tokenizer; distil from a teacher with another "
                          f"tokenizer alone, with loss=ot (MultiLevelOT) or loss=uld (ULD)")
    return errors


def route_field(node: Mapping[str, Any] | None) -> str | None:
    """The example field whose value picks each example's member (routed teachers), else None."""
    if teacher_kind(node) == SEVERAL and node.get("combine") == ROUTE:
        return str(node["route_field"])
    return None


# -- building ---------------------------------------------------------------------------------------------------------
def build_teacher(node: Mapping[str, Any] | None, run: Mapping[str, Any], student_tokenizer: PreTrainedTokenizerBase,
                  teacher_tokenizer: PreTrainedTokenizerBase | None, train_examples: Sequence[Any],
                  make_sampler: SamplerFactory) -> Teacher | None:
    """The run's teacher from its config node (None without one). `run` is the composed config (task, policy);
    `teacher_tokenizer` is a model teacher's own (loaded at start-up to compare vocabularies): it reads its own tokens
    when they differ from the student's. `make_sampler(model, tokenizer)` gives a model teacher its sampler. Outside
    teachers and members are opened and checked first, so a mismatch stops the run before any model loads."""
    kind = teacher_kind(node)
    if kind is None:
        return None
    if kind != SEVERAL:
        outside = _outside(node, run, student_tokenizer, train_examples) if kind != MODEL else None
        return outside or _model(node, student_tokenizer, teacher_tokenizer, make_sampler)
    members = dict(node["members"])
    outside = {name: _outside(member, run, student_tokenizer, train_examples, name)
               for name, member in members.items() if teacher_kind(member) != MODEL}
    built = {name: outside.get(name) or _model(member, student_tokenizer, None, make_sampler, name)
             for name, member in members.items()}
    if node["combine"] == ROUTE:
        from kdlab.teachers.routed import RoutedTeacher

        return RoutedTeacher(built, node["routes"], name=str(node.get("name") or "routed"))
    from kdlab.teachers.mixture import MixtureTeacher

    weights = dict(node.get("weights") or {}) or {n: 1.0 for n in members}
    return MixtureTeacher(built, {n: float(weights.get(n, 1.0)) for n in members}, len(student_tokenizer),
                          int(node["top_k"]), name=str(node.get("name") or "mixture"))


def _model(node: Mapping[str, Any], student_tokenizer: PreTrainedTokenizerBase,
           tokenizer: PreTrainedTokenizerBase | None, make_sampler: SamplerFactory, member: str | None = None):
    """A model teacher loaded with its own tokenizer (`tokenizer`, or loaded here for a member); it reads the student's
    tokens when the two tokenizers have the same vocabulary."""
    from kdlab.models.loading import load_model, load_tokenizer, same_vocabulary
    from kdlab.teachers.model import ModelTeacher

    tokenizer = tokenizer or load_tokenizer(node)
    model = load_model(node, tokenizer)
    own = None if same_vocabulary(student_tokenizer, tokenizer) else tokenizer
    return ModelTeacher(model, len(tokenizer), make_sampler(model, tokenizer), own,
                        name=member or str(node.get("name") or "teacher"))


def _outside(node: Mapping[str, Any], run: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
             train_examples: Sequence[Any], name: str | None = None) -> Teacher:
    """Open the cache (its manifest checked against this run's tokenizer, task settings, data, k and, from the
    policy, its targets: the ground truth, or for SeqKD the teacher's samples under this run's sampling settings;
    then its files verified as `teacher.verify` says, ids against the student's vocabulary) or connect to the server
    (checked against the student's vocabulary and tokenizer, and probed with the run's k and longest row): every
    mismatch stops here, before training."""
    from kdlab.teachers.fingerprint import tokenizer_fingerprint

    policy, task = run["policy"], run["task"]
    if teacher_kind(node) == CACHED:
        from kdlab.teachers.cache import (
            GROUND_TRUTH,
            CacheError,
            check_cache_matches,
            open_cache,
            read_manifest,
            run_fingerprints,
            sampled_targets,
        )
        from kdlab.teachers.cached import CachedTeacher

        manifest = read_manifest(node["dir"])  # which run it was written for, before its files are read
        seqkd = policy.get("fixed_source") == "teacher" and float(policy.get("student_fraction", 0.0)) < 1
        targets = sampled_targets(policy["sampling"]) if seqkd else GROUND_TRUTH
        expected = run_fingerprints(task, tokenizer, train_examples, targets=targets)
        if node.get("top_k") is not None:
            expected["top_k"] = int(node["top_k"])
        difference = check_cache_matches(manifest, expected)
        if difference:
            how = "cache.targets=teacher" if seqkd else "cache.targets=ground_truth"
            raise CacheError(f"{difference} ({node['dir']}); kdlab-cache-teacher and train.py take the same task "
                             f"and data overrides: write a cache for this run with kdlab-cache-teacher "
                             f"<this run's overrides> {how} cache.dir=<dir>")
        verify = {key: node[key] for key in ("verify", "verify_blocks", "verify_seed") if node.get(key) is not None}
        cache = open_cache(node["dir"], vocab_size=len(tokenizer), **verify)
        return CachedTeacher(cache, tokenizer.pad_token_id, name=name or str(node.get("name") or CACHED))
    from kdlab.teachers.client import TeacherClient
    from kdlab.teachers.remote import RemoteTeacher

    client = TeacherClient(str(node["url"]), top_k=int(node["top_k"]), model=node.get("model"),
                           api_key=node.get("api_key"), timeout=float(node["timeout"]),
                           retries=int(node["retries"]), backoff=float(node["backoff"]),
                           max_batch=int(node["max_batch"]),
                           allow_insecure_key=bool(node.get("allow_insecure_key", False)))
    # the longest row a step sends: a prompt and its target, or the student's sample when the policy draws them
    on_policy = float(policy.get("student_fraction", 0.0)) > 0
    target = max(int(task["max_target_tokens"]), int(policy["sampling"]["max_new_tokens"]) if on_policy else 0)
    client.check(vocab_size=len(tokenizer), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                 longest=int(task["max_prompt_tokens"]) + target)  # k and length refused now, not mid-run
    return RemoteTeacher(client, name=name or str(node.get("name") or REMOTE),
                         targets_only=run["loss"].get("name") == RKL_SAMPLED)
