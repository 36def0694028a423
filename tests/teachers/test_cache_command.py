"""kdlab-cache-teacher ends by printing the train.py command that reads its cache: the same task overrides (so the
run tokenizes the examples the cache scored), without the cache's and the teacher's, and a policy that trains on
what was cached."""

from kdlab.run.validate import config_errors
from kdlab.teachers.cache import training_command
from tests.conftest import compose


def test_the_printed_command_keeps_the_task_overrides_and_drops_the_caches():
    overrides = ["cache.dir=tc", "teacher=arith_teacher", "cache.top_k=32", "task.train_size=256", "debug=limit",
                 "hydra.run.dir=.", "seed=3"]
    command = training_command(overrides, "tc", "ground_truth")
    assert command == ("python train.py teacher=cached teacher.dir=tc policy=supervised task.train_size=256 "
                       "debug=limit seed=3")
    assert config_errors(compose(command.split()[2:])) == []


def test_teacher_samples_train_with_seqkd_unless_a_policy_is_named():
    assert training_command(["cache.targets=teacher"], "s", "teacher") == (
        "python train.py teacher=cached teacher.dir=s policy=seqkd")
    assert training_command(["policy=mixed", "policy.sampling.temperature=0.7"], "s", "teacher") == (
        "python train.py teacher=cached teacher.dir=s policy=mixed policy.sampling.temperature=0.7")
