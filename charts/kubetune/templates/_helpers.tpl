{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: fullnameOverride, else <release>-kubetune (just <release> when it contains the name). */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules: exactly the verbs it uses, nothing else (no wildcards).
tests/operator/test_rbac_usage.py runs the operator and checks these against the requests it sends.
- kopf lists and watches FineTuneJobs, EvalJobs, RayJobs and RayServices and patches its annotations
  on the kubetune objects; the operator reads FineTuneJobs (a fineTuneJobRef) and EvalJobs, writes
  their status subresource and creates the EvalJob that FineTuneJob.spec.evaluation asks for.
- It creates, reads and deletes the RayJobs (training, evaluation) and RayServices (serving) it owns,
  and patches the training RayJobs (spec.suspend); it creates, reads and deletes the ConfigMaps with
  resolved configs, and posts core/v1 Events (kopf posts those, not events.k8s.io).
- For each job it creates the job's own ServiceAccount, Role and RoleBinding (owned by the job; "already
  exists" is read back to check the owner). The Role lets that job's pods `get`/`patch` the status of
  that one job (`resourceNames`). Kubernetes only lets the operator grant what it holds itself (the RBAC
  escalation check): that is the only reason it may `get` the FineTuneJob/EvalJob status subresources,
  which it never reads.
- `update` on the jobs' `finalizers` subresource is never called either: the children's owner references
  set `blockOwnerDeletion`, which clusters with the OwnerReferencesPermissionEnforcement admission plugin
  (OpenShift, for one) allow only to whoever may update the owner's finalizers.
- NetworkPolicies (unless networkPolicy.enabled is false): one per Ray cluster, owned by its job; created
  before the cluster, read back on "already exists", deleted with the job's other children after
  ttlSecondsAfterFinished.
- Secrets: only in namespaced mode, `get` (the operator checks that an EvalJob's apiKeySecretRef exists;
  it never reads Secrets cluster-wide, and treats a 403 as "cannot verify").
Argument: a dict with "secrets" (bool).
*/}}
{{- define "kubetune.rules" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
- apiGroups: [kubetune.io]
  resources: [evaljobs]
  verbs: [get, list, watch, patch, create]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, evaljobs/status]
  verbs: [get, patch]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers, evaljobs/finalizers]
  verbs: [update]
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
{{- if .networkPolicies }}
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete]
{{- end }}
{{- if .secrets }}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- end }}
