"""The kubetune.io/v1alpha1 API: pydantic models that generate the CRDs and drive operator and trainer."""

from kubetune.api.evaljob import EvalJob, EvalJobSpec, EvalJobStatus
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

__all__ = ["EvalJob", "EvalJobSpec", "EvalJobStatus", "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus"]
