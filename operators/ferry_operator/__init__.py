"""The Ferry operator: InferenceCluster (serving.ferry.dev/v1alpha1) → the serving workloads.

    spec.py        the custom resource's spec, parsed and validated (pure)
    manifests.py   the objects an InferenceCluster renders to (pure; podspec.py builds the pods)
    reconcile.py   observed state → plan: objects to apply, drains, pod deletions, scaling, status (pure)
    nodes.py       spot-termination taints → preemption notices (pure)
    kube.py        reads and writes the API server (blocking kubernetes client, run in threads)
    scheduler_client.py   the scheduler's ListInstances / DrainInstance / NotifyPreemption (grpc.aio)
    handlers.py    the kopf handlers: observe → reconcile → execute the plan
"""
