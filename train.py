"""Entry point: `python train.py [group=option ...] [key=value ...]` (Hydra); see README.md.

Hydra composes the config and `kdlab.run.train.run_job` runs it in the job's directory: how a failed or interrupted job
is marked there, and what happens to a sweep after it, is documented (and tested) in the package; how
`hydra.run.dir=<run> ckpt_path=last` resumes a run without changing it is `kdlab.run.resume`.
"""

import sys

import hydra
from omegaconf import DictConfig

from kdlab.run.compose import expand_overrides
from kdlab.run.resolvers import register_resolvers
from kdlab.run.resume import ResumeRefused, resume_argv

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from kdlab.run.train import run_job  # imported here so `--help` and config errors stay fast

    return run_job(cfg)


if __name__ == "__main__":
    sys.argv[1:] = expand_overrides(sys.argv[1:])  # `student=tiny teacher=tiny`: presets of conf/model/ in both roles
    try:  # before Hydra writes .hydra/ into the run directory: a resume reuses or checks the run's own overrides
        sys.argv[1:] = resume_argv(sys.argv[1:])
    except ResumeRefused as err:
        sys.exit(f"error: {err}")
    main()
