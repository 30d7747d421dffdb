"""Test support shipped with kubetune: a stateful fake Kubernetes API over HTTP."""
