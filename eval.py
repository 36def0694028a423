"""Entry point: `python eval.py ckpt_path=<checkpoint>` or `python eval.py student_dir=<exported student>` (Hydra,
conf/eval.yaml): the student's task score as train.py measures it, in its own directory; see kdlab.run.evaluate."""

from kdlab.run.evaluate import main

if __name__ == "__main__":
    main()
