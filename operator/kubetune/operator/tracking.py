"""What `spec.tracking` asks of the pods: its credentials, as environment variables from the Secrets.

The operator never reads a Secret: it names them in `valueFrom.secretKeyRef`, and the kubelet fills them
in. Every one is `optional`: a missing Secret or key must not keep the training from starting (tracking
never fails a job); the trainer then finds the variable empty and reports it once (status.trackingWarning).
"""

from __future__ import annotations

from kubetune.api.tracking import WANDB_API_KEY_ENV, TrackingSpec
from kubetune.operator.kube import Obj


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def tracking_env(tracking: TrackingSpec | None) -> list[Obj]:
    """MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN and WANDB_API_KEY from the Secrets spec.tracking names."""
    if tracking is None:
        return []
    env: list[Obj] = []
    creds = tracking.mlflow.credentials_secret_ref if tracking.mlflow else None
    if creds is not None:
        env += [_secret_env(var, creds.name, key) for var, key in creds.env().items()]
    key_ref = tracking.wandb.api_key_secret_ref if tracking.wandb else None
    if key_ref is not None:
        env.append(_secret_env(WANDB_API_KEY_ENV, key_ref.name, key_ref.key))
    return env
