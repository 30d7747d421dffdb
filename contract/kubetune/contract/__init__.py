"""What crosses process boundaries between the operator, the trainer and the evaluator.

- `evalplan`: the evaluation plan the operator writes and the evaluator reads;
- `progress`: how a running job reports progress and results into its custom resource's status;
- `storage`: storage URIs (pvc://, file://, s3://, ...) as every process resolves them;
- `templates`: prompt templates filled with a row's fields, the same in the trainer and the evaluator;
- `redact`: what an error may show of data and of servers' answers (names escaped, excerpts bounded).

Depends on `kubetune.api` alone; no kopf, no ML framework (import-linter contracts in pyproject.toml).
"""
