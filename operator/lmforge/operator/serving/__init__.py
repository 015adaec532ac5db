"""Serving: InferenceService -> Deployment, Service, adapters ConfigMap, HPA."""
