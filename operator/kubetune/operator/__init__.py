"""The kubetune operator (kopf): FineTuneJob -> ConfigMap + KubeRay RayJob, RayJob status -> conditions.

Layers, one way only: `handlers` route -> `reconcile` decides -> `builders` return plain dicts ->
`kube` is the only module that talks to the Kubernetes API. Never imports torch, ray, deepspeed or vllm.
"""
