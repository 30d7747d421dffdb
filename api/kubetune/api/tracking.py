"""`spec.tracking` of a FineTuneJob (and an EvalJob): where a run's parameters and metrics are logged.

Any of MLflow, Weights & Biases and TensorBoard, each optional. Credentials stay in Secrets: the operator
gives them to the Ray pods as environment variables (`valueFrom.secretKeyRef`) and never reads them; the
trainer and the evaluator log with the libraries' own clients. Tracking is best effort: a backend that
fails is reported once (status `trackingWarning` and the driver log) and training goes on.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from kubetune.api.common import DNS_SUBDOMAIN, ApiModel, SecretKeyReference, Uri
from kubetune.api.errors import FieldError

# What MLflow's client accepts as a tracking URI and kubetune can reach from a pod: a tracking server
# (http/https), Databricks (a workspace profile), or a file store on a local path (local runs, tests).
MLFLOW_URI_PATTERN = r"^(https?://[^\s/]+(/[^\s]*)?|file:///[^\s]*|databricks(://[A-Za-z0-9_.-]+)?)$"
# W&B refuses these characters in project and entity names.
WANDB_NAME_PATTERN = r"^[^/\\#?%:\s]+$"
# A Secret's data key, as Kubernetes validates it.
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
SECRET_NAME_PATTERN = rf"^{DNS_SUBDOMAIN}$"

# The environment variables the operator fills from the Secrets (what each client reads by itself).
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
WANDB_API_KEY_ENV = "WANDB_API_KEY"
SECRET_ENVS = (MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV, WANDB_API_KEY_ENV)


class MlflowCredentials(ApiModel):
    """A Secret holding MLflow credentials: a username and a password key (HTTP basic auth, MLflow's own
    auth) or a token key (a bearer token, e.g. Databricks), given to the pods as MLFLOW_TRACKING_USERNAME,
    MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_TOKEN."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.usernameKey) == has(self.passwordKey)",
                 "message": "mlflow.credentialsSecretRef: set usernameKey and passwordKey together"},
                {"rule": "has(self.usernameKey) || has(self.tokenKey)",
                 "message": "mlflow.credentialsSecretRef: set usernameKey and passwordKey, or tokenKey"},
            ]
        }
    }

    name: str = Field(description="Name of the Secret (same namespace).", min_length=1, max_length=253,
                      pattern=SECRET_NAME_PATTERN)
    username_key: str | None = Field(default=None, description="Key of the username (MLFLOW_TRACKING_USERNAME).",
                                     min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    password_key: str | None = Field(default=None, description="Key of the password (MLFLOW_TRACKING_PASSWORD).",
                                     min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    token_key: str | None = Field(default=None, description="Key of a bearer token (MLFLOW_TRACKING_TOKEN).",
                                  min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)

    @model_validator(mode="after")
    def _complete(self) -> MlflowCredentials:
        if (self.username_key is None) != (self.password_key is None):
            raise FieldError("passwordKey" if self.password_key is None else "usernameKey",
                             "set usernameKey and passwordKey together")
        if self.username_key is None and self.token_key is None:
            raise ValueError("set usernameKey and passwordKey, or tokenKey")
        return self

    def env(self) -> dict[str, str]:
        """Environment variable -> the Secret's key it comes from."""
        pairs = {MLFLOW_USERNAME_ENV: self.username_key, MLFLOW_PASSWORD_ENV: self.password_key,
                 MLFLOW_TOKEN_ENV: self.token_key}
        return {env: key for env, key in pairs.items() if key is not None}


class MlflowTracking(ApiModel):
    """An MLflow run per job, found again by the job's uid (tag `kubetune.runKey`): a retry continues it,
    and the job's evaluation logs its scores to it."""

    tracking_uri: str = Field(
        description="The tracking server (https://mlflow.example.com), `databricks`, or a file store "
        "(file:///path, local runs only; kubetune opts in to MLflow's file store for it).",
        min_length=1, max_length=2048, pattern=MLFLOW_URI_PATTERN)
    experiment: str = Field(default="kubetune", description="Experiment name (created if missing).",
                            min_length=1, max_length=500)
    credentials_secret_ref: MlflowCredentials | None = Field(
        default=None, description="A Secret with the server's credentials (none for an open server).")


class WandbMode(StrEnum):
    """Whether W&B sends the run to its server or only writes it to files (`wandb sync` sends it later)."""

    ONLINE = "online"
    OFFLINE = "offline"


class WandbTracking(ApiModel):
    """A Weights & Biases run per job, with the job's uid as its run id: a retry resumes it, and the job's
    evaluation logs its scores to it."""

    project: str = Field(description="W&B project.", min_length=1, max_length=128, pattern=WANDB_NAME_PATTERN)
    entity: str | None = Field(default=None, description="W&B entity (user or team); default: the API key's.",
                               min_length=1, max_length=128, pattern=WANDB_NAME_PATTERN)
    api_key_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding the W&B API key (WANDB_API_KEY); required online.")
    mode: WandbMode = Field(default=WandbMode.ONLINE, description="online, or offline: the run is written "
                            "under the job's output (wandb/) for `wandb sync`.")
    base_url: str | None = Field(default=None, description="A self-hosted W&B server's URL (WANDB_BASE_URL).",
                                 pattern=r"^https?://[^\s]+$", max_length=2048)


class TensorBoardTracking(ApiModel):
    """TensorBoard event files, one folder per job: `<logUri>/<job name>`."""

    log_uri: Uri | None = Field(
        default=None, description="Where the event files go: a path, pvc://claim/path or an object store "
        "(s3://bucket/prefix, gs://...; written locally and uploaded after every epoch); default "
        "`<spec.output.uri>/tensorboard`.")


class TrackingSpec(ApiModel):
    """Experiment tracking: parameters at start, step and epoch metrics, the best checkpoint's URI at the end
    (weights are not uploaded), and the evaluation's scores. Rank 0 logs; a failing backend never fails
    the job."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.mlflow) || has(self.wandb) || has(self.tensorboard)",
                 "message": "tracking: set at least one of mlflow, wandb, tensorboard"},
            ]
        }
    }

    mlflow: MlflowTracking | None = Field(default=None, description="Log to MLflow.")
    wandb: WandbTracking | None = Field(default=None, description="Log to Weights & Biases.")
    tensorboard: TensorBoardTracking | None = Field(default=None, description="Write TensorBoard event files.")

    @model_validator(mode="after")
    def _some_backend(self) -> TrackingSpec:
        if self.mlflow is None and self.wandb is None and self.tensorboard is None:
            raise ValueError("set at least one of mlflow, wandb, tensorboard")
        return self

    def with_defaults(self, output_uri: str) -> TrackingSpec:
        """This spec with the defaults that depend on the job filled in: tensorboard.logUri."""
        if self.tensorboard is None or self.tensorboard.log_uri is not None:
            return self
        log_uri = f"{output_uri.rstrip('/')}/tensorboard"
        return self.model_copy(update={"tensorboard": TensorBoardTracking(log_uri=log_uri)})

    def uris(self) -> list[str]:
        """Storage URIs the tracking writes to (a pvc:// one must be mounted)."""
        return [self.tensorboard.log_uri] if self.tensorboard and self.tensorboard.log_uri else []
