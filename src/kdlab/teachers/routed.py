"""Several teachers sharing the student's tokenizer, one per example, chosen by an example field.

    python train.py teacher=arith_pair teacher.combine=route teacher.route_field=steps \
        'teacher.routes={2: peer, 3: teacher, 4: teacher}'

Each example is distilled from the member `routes` maps its `route_field` value to (values are compared as text; a
value without a route stops the run at its first batch). The answer is each member's scores with the rows it
teaches (`Members` without a mixture): the objective sums each member's own loss over its rows, so a routed row's
loss is exactly its member's single-teacher loss, and each member's part is logged as `train/teacher/<name>`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from kdlab.data.batch import Batch
from kdlab.teachers.base import LOGITS, Members, Teacher
from kdlab.teachers.mixture import Several


class RoutedTeacher(Several):
    """Members by name and the route from a field value to a member (see the module doc)."""

    def __init__(self, members: Mapping[str, Teacher], routes: Mapping[Any, str], name: str = "routed"):
        super().__init__(members)
        self.routes = {str(k): str(v) for k, v in routes.items()}
        self.name = name

    def scores(self, batch: Batch, prepared: Any = None, want: str = LOGITS, groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Members:
        scores = self.member_scores(batch, prepared, groups)
        rows = self.member_rows(batch)
        out = Members({name: (score, rows[name]) for name, score in scores.items()})
        return then(out) if then is not None else out

    def member_rows(self, batch: Batch) -> dict[str, Tensor]:
        """Which rows each member teaches (bool, (batch,)): its routed examples."""
        device = batch.student.target_mask.device
        if batch.route is None:
            raise ValueError("teacher.combine=route needs each example's teacher.route_field value")
        missing = sorted({value for value in batch.route if value not in self.routes})
        if missing:
            shown = ", ".join(repr(v) for v in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"teacher.routes has no member for {shown}; routes: {self.routes}")
        owner = [self.routes[value] for value in batch.route]
        return {name: torch.tensor([o == name for o in owner], dtype=torch.bool, device=device)
                for name in self.members}
