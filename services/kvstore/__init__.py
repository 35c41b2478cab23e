"""The KV-cache store service: full KV blocks shared by all workers (`ferry serve kvstore`).

    store.py    KVBlockStore: memory LRU + optional disk tier, thread-safe, no gRPC
    server.py   the KVStore gRPC servicer and its Prometheus metrics
    client.py   KVStoreClient: async client for workers
    main.py     settings and the service entry point
"""
