"""kubetune: declarative full-parameter fine-tuning and evaluation of open LLMs on Kubernetes."""

__version__ = "0.1.0"

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
