"""One distillation step: the LightningModule (hooks), the step (targets -> scores -> terms -> loss), the data policy,
rewards, rollouts and resilience."""
